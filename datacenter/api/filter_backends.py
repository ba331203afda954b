"""The filter backend of every API list: django-filter, made to accept exactly what the schema says.

django-filter's defaults disagree with the OpenAPI schema drf-spectacular derives from them, and
generated clients trust the schema:

* a foreign-key filter (`?tenant=5`) is a ModelChoiceFilter: an id that does not exist (or that
  the caller cannot see) is a 400 "Select a valid choice", although the schema says "integer".
  Here it is an integer filter on the key: an unknown id matches nothing (and says nothing about
  whether such an object exists in another tenant).
* a boolean filter quietly ignores a value that is not a boolean (`?enabled=null` lists
  everything). Here only `true` and `false` are accepted, anything else is a 400 naming it.
* a number filter on an integer field accepts `-1.9`. Here integer fields take integers only,
  within the model field's own bounds (the same bounds the schema publishes).

Every app's filterset keeps its declarations; the backend rewrites these three kinds of filter
when it builds the filterset class, so the API, the schema and the dashboard agree.
"""

from __future__ import annotations

from functools import cache

import django_filters
from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema_field
from rest_framework.exceptions import ValidationError as DRFValidationError

BOOLEAN_WORDS = {"true": True, "false": False}
# PostgreSQL's bigint: a larger id cannot exist, and the ORM would refuse to compare with it.
BIGINT_MAX = 2**63 - 1


class StrictBooleanField(forms.Field):
    """`true` or `false` (the words a generated client sends); anything else is an error."""

    def to_python(self, value):
        if value in (None, ""):
            return None
        word = str(value).strip().lower()
        if word not in BOOLEAN_WORDS:
            raise ValidationError(f"{value!r} is not a boolean: use true or false.", code="invalid")
        return BOOLEAN_WORDS[word]


@extend_schema_field({"type": "boolean"})
class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = StrictBooleanField


class IntegerFilter(django_filters.NumberFilter):
    """An integer filter; `min_value`/`max_value` (from the model field) bound what it accepts."""

    field_class = forms.IntegerField


def _integer_bounds(field: models.Field) -> tuple[int | None, int | None]:
    low: int | None = None
    high: int | None = None
    for validator in field.validators:
        if isinstance(validator, MinValueValidator) and isinstance(validator.limit_value, int):
            low = validator.limit_value if low is None else max(low, validator.limit_value)
        if isinstance(validator, MaxValueValidator) and isinstance(validator.limit_value, int):
            high = validator.limit_value if high is None else min(high, validator.limit_value)
    return low, high


def _integer_filter(name: str, field: models.Field, original: django_filters.Filter) -> IntegerFilter:
    low, high = _integer_bounds(field)
    if isinstance(field, models.ForeignKey | models.AutoField | models.BigAutoField):
        low, high = (1 if low is None else low), (BIGINT_MAX if high is None else high)
    schema: dict = {"type": "integer"}
    extra: dict = {}
    if low is not None:
        schema["minimum"] = extra["min_value"] = low
    if high is not None:
        schema["maximum"] = extra["max_value"] = high
    strict = IntegerFilter(field_name=original.field_name, lookup_expr=original.lookup_expr,
                           label=original.label, exclude=original.exclude, **extra)
    return extend_schema_field(schema)(strict)


def _model_field(model: type[models.Model], path: str) -> models.Field | None:
    """The model field a filter's `field_name` ("vip__tenant") ends at, or None."""
    current = model
    field = None
    for part in path.split("__"):
        try:
            field = current._meta.get_field(part)
        except Exception:
            return None
        if field.is_relation and field.related_model is not None and part != path.split("__")[-1]:
            current = field.related_model
    return field


def strict_filterset(filterset_class: type[django_filters.FilterSet]) -> type[django_filters.FilterSet]:
    """A subclass of `filterset_class` whose FK, boolean and integer filters are strict."""
    return _strict(filterset_class)


@cache
def _strict(filterset_class: type[django_filters.FilterSet]) -> type[django_filters.FilterSet]:
    model = filterset_class._meta.model
    replaced: dict[str, django_filters.Filter] = {}
    for name, original in filterset_class.base_filters.items():
        if getattr(original, "method", None) or type(original) in (StrictBooleanFilter, IntegerFilter):
            continue
        field = _model_field(model, original.field_name) if model is not None else None
        if isinstance(original, django_filters.BooleanFilter):
            replaced[name] = StrictBooleanFilter(field_name=original.field_name,
                                                 lookup_expr=original.lookup_expr, label=original.label)
        elif original.lookup_expr not in ("exact", "gte", "lte", "gt", "lt"):
            continue
        elif isinstance(original, django_filters.ModelChoiceFilter) and not isinstance(
                original, django_filters.ModelMultipleChoiceFilter):
            if field is not None and isinstance(field, models.ForeignKey):
                replaced[name] = _integer_filter(name, field.target_field, original)
                replaced[name].field_name = original.field_name
        elif isinstance(original, django_filters.NumberFilter) and field is not None:
            target = field.target_field if isinstance(field, models.ForeignKey) else field
            if isinstance(target, models.IntegerField | models.AutoField):
                replaced[name] = _integer_filter(name, target, original)
    if not replaced:
        return filterset_class
    strict = type(filterset_class.__name__, (filterset_class,), {"__module__": filterset_class.__module__})
    strict.base_filters = {**filterset_class.base_filters, **replaced}
    return strict


def _takes_free_text(filter_: django_filters.Filter) -> bool:
    from datacenter.api.filters import IPAddressFilter

    if isinstance(filter_, django_filters.ChoiceFilter):  # "" is valid when it is one of the choices
        choices = filter_.extra.get("choices") or []
        return any(value == "" for value, _label in (choices() if callable(choices) else choices))
    return isinstance(filter_, django_filters.CharFilter) and not isinstance(filter_, IPAddressFilter)


class StrictDjangoFilterBackend(DjangoFilterBackend):
    def get_filterset_class(self, view, queryset=None):
        filterset_class = super().get_filterset_class(view, queryset)
        return strict_filterset(filterset_class) if filterset_class is not None else None

    def filter_queryset(self, request, queryset, view):
        # django-filter skips a parameter given empty (`?enabled=`); for anything but free text the
        # schema says an empty value is invalid, so it is a 400 rather than "no filter".
        filterset_class = self.get_filterset_class(view, queryset)
        if filterset_class is not None:
            empty = sorted(name for name, filter_ in filterset_class.base_filters.items()
                           if request.query_params.get(name) == "" and not _takes_free_text(filter_))
            if empty:
                raise DRFValidationError({name: ["This filter needs a value."] for name in empty})
        return super().filter_queryset(request, queryset, view)
