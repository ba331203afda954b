"""Two per-request reads in plain SQL: the API token with its user, and a user's roles.

Every API call authenticates its token (ApiTokenAuthentication) and reads its caller's roles
(scoping._cached_roles). Through the ORM each is a query compiled from scratch per request:
profiled, compiling cost several times running them (docs/bench-load.md). The SQL here is built
once from the models' own field lists, and the values go through the same database converters
the ORM applies, so the objects are the ORM's: `from_db` instances, not saved by this module.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.db import connection, models

from .models import ApiToken, Membership


def _select_list(model: type[models.Model], alias: str) -> tuple[str, list[models.Field]]:
    fields = list(model._meta.concrete_fields)
    quote = connection.ops.quote_name
    return ", ".join(f"{alias}.{quote(f.column)}" for f in fields), fields


def _converters(fields: list[models.Field]) -> list[tuple[Any, list]]:
    """Per field: (its column expression, the converters the ORM's compiler would apply)."""
    result = []
    for field in fields:
        column = field.get_col(field.model._meta.db_table)
        functions = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        result.append((column, functions))
    return result


def _converted(values: tuple, converters: list[tuple[Any, list]]) -> list:
    out = []
    for value, (column, functions) in zip(values, converters, strict=True):
        for function in functions:
            value = function(value, column, connection)
        out.append(value)
    return out


@cache
def _token_query(vendor: str) -> tuple[str, list[models.Field], list[models.Field]]:
    user_model = get_user_model()
    token_cols, token_fields = _select_list(ApiToken, "t")
    user_cols, user_fields = _select_list(user_model, "u")
    quote = connection.ops.quote_name
    sql = (
        f"SELECT {token_cols}, {user_cols} FROM {quote(ApiToken._meta.db_table)} t "  # noqa: S608
        f"JOIN {quote(user_model._meta.db_table)} u ON u.{quote(user_model._meta.pk.column)} = t."
        f"{quote(ApiToken._meta.get_field('user').column)} WHERE t.{quote('key_hash')} = %s"
    )
    return sql, token_fields, user_fields


def token_with_user(key_hash: str) -> ApiToken | None:
    """The token whose key hashes to `key_hash`, its `user` loaded (one query), or None."""
    sql, token_fields, user_fields = _token_query(connection.vendor)
    with connection.cursor() as cursor:
        cursor.execute(sql, [key_hash])
        row = cursor.fetchone()
    if row is None:
        return None
    split = len(token_fields)
    token_values = _converted(row[:split], _converters_for(ApiToken, connection.vendor))
    user_values = _converted(row[split:], _converters_for(get_user_model(), connection.vendor))
    db = connection.alias
    token = ApiToken.from_db(db, [f.attname for f in token_fields], token_values)
    token.user = get_user_model().from_db(db, [f.attname for f in user_fields], user_values)
    return token


# Per vendor, not per connection: a converter bound to one connection's operations reads only
# settings that every connection of the alias shares (its time zone).
@cache
def _converters_for(model: type[models.Model], vendor: str) -> list[tuple[Any, list]]:
    return _converters(list(model._meta.concrete_fields))


@cache
def _roles_query(vendor: str) -> str:
    quote = connection.ops.quote_name
    return (
        f"SELECT {quote('tenant_id')}, {quote('role')} FROM {quote(Membership._meta.db_table)} "  # noqa: S608
        f"WHERE {quote('user_id')} = %s"
    )


def roles_of(user_id: int) -> dict[int, str]:
    """{tenant_id: role} of a user's memberships (one query)."""
    with connection.cursor() as cursor:
        cursor.execute(_roles_query(connection.vendor), [user_id])
        return dict(cursor.fetchall())
