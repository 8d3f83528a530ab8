"""Serializer fields that take only the JSON types the schema says.

DRF coerces: a CharField takes `0` as "0", an IntegerField takes "64", a BooleanField takes `0`,
"yes", "on"... A client sending the wrong type is then never told, and the schema promises more
than the server checks. These fields refuse a JSON value of the wrong type with 400
`validation_error`. Form data (multipart uploads, query parameters) is text by nature and is
parsed as usual.
"""

from __future__ import annotations

from django.db import models
from rest_framework import serializers
from rest_framework.utils import html


def _from_form(field: serializers.Field) -> bool:
    return html.is_html_input(getattr(field.root, "initial_data", None))


class _JsonTyped:
    json_types: tuple[type, ...] = ()
    type_message = "Wrong type."

    def to_internal_value(self, data):
        if not _from_form(self) and (isinstance(data, bool) or not isinstance(data, self.json_types)):
            raise serializers.ValidationError(self.type_message, code="invalid")
        return super().to_internal_value(data)


class StrictCharField(_JsonTyped, serializers.CharField):
    json_types = (str,)
    type_message = "Must be a string."


class StrictSlugField(_JsonTyped, serializers.SlugField):
    json_types = (str,)
    type_message = "Must be a string."


class StrictURLField(_JsonTyped, serializers.URLField):
    json_types = (str,)
    type_message = "Must be a string."


class StrictIntegerField(_JsonTyped, serializers.IntegerField):
    json_types = (int,)
    type_message = "Must be an integer."


class StrictFloatField(_JsonTyped, serializers.FloatField):
    json_types = (int, float)
    type_message = "Must be a number."


class StrictBooleanField(serializers.BooleanField):
    """JSON `true`/`false` only; form fields may say `true`/`false` or `1`/`0`."""

    default_error_messages = {"invalid": "Must be true or false."}
    FORM_VALUES = {"true": True, "1": True, "false": False, "0": False}

    def to_internal_value(self, data):
        if isinstance(data, bool):
            return data
        if _from_form(self) and isinstance(data, str) and data.strip().lower() in self.FORM_VALUES:
            return self.FORM_VALUES[data.strip().lower()]
        self.fail("invalid")


class StrictModelSerializer(serializers.ModelSerializer):
    """A ModelSerializer whose fields derived from the model take only their JSON types."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
        models.URLField: StrictURLField,
        models.IntegerField: StrictIntegerField,
        models.PositiveIntegerField: StrictIntegerField,
        models.SmallIntegerField: StrictIntegerField,
        models.PositiveSmallIntegerField: StrictIntegerField,
        models.BigIntegerField: StrictIntegerField,
        models.FloatField: StrictFloatField,
        models.BooleanField: StrictBooleanField,
    }
