"""Query parameters that refuse what they cannot read.

DRF and django-filter are lenient by default: `?archived=-148167` filters nothing, an unknown
`?ordering=` is dropped. A client with a typo then silently gets the wrong rows, and the schema
promises more than the server checks. These variants answer 400 `validation_error` instead,
naming the parameter, and document only what the view really supports.
"""

from __future__ import annotations

import django_filters
from django import forms
from django_filters import rest_framework as filterset_backends
from rest_framework import filters
from rest_framework.exceptions import ValidationError


class TrueFalseField(forms.Field):
    """`true`/`false` (also `1`/`0`, `yes`/`no`, any case); empty means "not given"; anything else is invalid."""

    def to_python(self, value):
        if value in (None, ""):
            return None
        text = str(value).strip().lower()
        if text in {"true", "1", "yes"}:
            return True
        if text in {"false", "0", "no"}:
            return False
        raise forms.ValidationError("Must be true or false.", code="invalid")


def query_flag(request, name: str) -> bool:
    """A view's own true/false query parameter (`?dry_run=true`): absent is false, unreadable is 400."""
    try:
        return bool(TrueFalseField(required=False).clean(request.query_params.get(name)))
    except forms.ValidationError as exc:
        raise ValidationError({name: exc.messages}) from None


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = TrueFalseField


class StrictOrderingFilter(filters.OrderingFilter):
    """`?ordering=` over the view's declared `ordering_fields` only; an unknown field is 400."""

    def get_valid_fields(self, queryset, view, context=None):
        return [(name, name) for name in getattr(view, "ordering_fields", None) or []]

    def get_ordering(self, request, queryset, view):
        """The client's (or the view's default) ordering, then the primary key: rows that tie (two characters
        of one name) keep one order from page to page, so paging never repeats or skips one."""
        ordering = super().get_ordering(request, queryset, view)
        if ordering and not any(term.lstrip("-") in ("pk", "id") for term in ordering):
            ordering = [*ordering, "pk"]
        return ordering

    def remove_invalid_fields(self, queryset, fields, view, request):
        allowed = {name for name, _ in self.get_valid_fields(queryset, view)}
        unknown = [term for term in fields if term.lstrip("-") not in allowed]
        if unknown:
            raise ValidationError({self.ordering_param: [f"Unknown ordering {unknown}; allowed: {sorted(allowed)}."]})
        return fields

    def get_schema_operation_parameters(self, view):
        fields = getattr(view, "ordering_fields", None) or []
        if not fields:
            return []
        names = "|".join(fields)
        return [
            {
                "name": self.ordering_param,
                "required": False,
                "in": "query",
                "description": f"Sort by {', '.join(fields)}; a leading `-` reverses. Comma-separate several. "
                "Empty: the default order.",
                "schema": {"type": "string", "pattern": rf"^(-?({names})(,-?({names}))*)?$"},
            }
        ]


class DeclaredSearchFilter(filters.SearchFilter):
    """`?search=` documented only on views that declare `search_fields` (elsewhere it does nothing)."""

    def get_schema_operation_parameters(self, view):
        return super().get_schema_operation_parameters(view) if getattr(view, "search_fields", None) else []


class DjangoFilterBackend(filterset_backends.DjangoFilterBackend):
    """django-filter's backend, skipped when no query parameter names one of the view's filters: building and
    validating an empty FilterSet form was a tenth of the character list's time (bench/load.py). Parameters
    are matched by prefix, so range filters' suffixed names (`x_min`, `x_after`) still run the backend."""

    def filter_queryset(self, request, queryset, view):
        filterset_class = self.get_filterset_class(view, queryset)
        if filterset_class is not None:
            names = tuple(filterset_class.base_filters)
            if not any(param.startswith(names) for param in request.query_params):
                return queryset
            # the schema lists a choice filter's values (an enum): an empty one is not among them, and
            # django-filter would silently ignore it (`?method=` answering every method)
            empty = [
                name
                for name, declared in filterset_class.base_filters.items()
                if isinstance(declared, (django_filters.ChoiceFilter, django_filters.MultipleChoiceFilter))
                and "" in request.query_params.getlist(name)
            ]
            if empty:
                raise ValidationError(
                    {name: ["Give one of the listed values, or leave the parameter out."] for name in empty}
                )
        return super().filter_queryset(request, queryset, view)
