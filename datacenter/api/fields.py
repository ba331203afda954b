"""Serializer fields that take exactly the JSON type the schema names.

DRF's CharField turns a number into text (`"description": 0` is stored as "0") and its
BooleanField takes "yes", 1 or "on"; the schema says "string" and "boolean", and a generated
client that sends the wrong type has a bug it should hear about. The API speaks JSON only
(datacenter/api/parsers.py), so a value of another JSON type is a 400 naming the field.
"""

from __future__ import annotations

from django.db import models
from rest_framework import serializers


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "Expected a string, got {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid", kind=type(data).__name__)
        return super().to_internal_value(data)


class StrictSlugField(serializers.SlugField):
    default_error_messages = {"not_a_string": "Expected a string, got {kind}."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string", kind=type(data).__name__)
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Expected true or false, got {value!r}."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", value=data)
        return data


def use_strict_model_fields() -> None:
    """Make every ModelSerializer build these for the model's text and boolean fields."""
    mapping = serializers.ModelSerializer.serializer_field_mapping
    for model_field in (models.CharField, models.TextField):
        mapping[model_field] = StrictCharField
    mapping[models.SlugField] = StrictSlugField
    mapping[models.BooleanField] = StrictBooleanField
