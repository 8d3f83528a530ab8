from django.core.paginator import Paginator as DjangoPaginator
from django.db.models import Count, Window
from django.db.models.query import ModelIterable
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination

BIGINT_MAX = 2**63 - 1


def _query_int(request, name: str, *, maximum: int | None = None) -> int | None:
    """A positive integer query parameter, None when absent; anything else is 400 naming the parameter."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    value = int(raw) if raw.isascii() and raw.isdigit() else 0
    if value < 1 or (maximum is not None and value > maximum):
        bound = f" from 1 to {maximum}" if maximum is not None else " of at least 1"
        raise ValidationError({name: [f"Must be a whole number{bound}."]})
    return value


class OneQueryPaginator(DjangoPaginator):
    """A page of a queryset and the total in one query (`COUNT(*) OVER ()` on each row of the page), instead
    of a COUNT(*) and then the page: one query less for every list (bench/load.py). Falls back to Django's
    COUNT(*) for an empty page (past the end, or nothing at all), a DISTINCT or combined query (where a window
    counts the wrong rows), a sliced, `.values()` or `.values_list()` queryset, or a list that is not a
    queryset. An object with `page_with_total(offset, limit)`, `count()` and slicing
    (`characters.selectors.CharacterRows`) reads its page and total itself."""

    TOTAL = "_alkemy_page_total"

    def page(self, number):
        queryset = self.object_list
        if hasattr(queryset, "page_with_total"):  # a row source that reads a page and the total at once
            return self._page_of_source(number)
        query = getattr(queryset, "query", None)
        if (
            query is None
            or query.distinct
            or query.combinator
            or query.is_sliced
            or getattr(queryset, "_iterable_class", None) is not ModelIterable
            or "count" in self.__dict__
        ):
            return super().page(number)
        try:
            number = int(number)
        except (TypeError, ValueError):
            return super().page(number)  # Django's PageNotAnInteger
        if number < 1:
            return super().page(number)
        bottom = (number - 1) * self.per_page
        if bottom + self.per_page > BIGINT_MAX:  # PostgreSQL cannot OFFSET that far: past the end for sure
            return super().page(number)
        rows = list(queryset.annotate(**{self.TOTAL: Window(Count("*"))})[bottom : bottom + self.per_page])
        if not rows:
            return super().page(number)
        self.__dict__["count"] = getattr(rows[0], self.TOTAL)  # Paginator.count is a cached_property
        return self._get_page(rows, number, self)


    def _page_of_source(self, number):
        try:
            number = int(number)
        except (TypeError, ValueError):
            return super().page(number)
        bottom = (number - 1) * self.per_page
        if number < 1 or bottom + self.per_page > BIGINT_MAX:
            return super().page(number)  # Django's errors; past the end for sure
        rows, total = self.object_list.page_with_total(bottom, self.per_page)
        if not rows:
            return super().page(number)  # COUNT(*): an empty first page, or past the end (404)
        self.__dict__["count"] = total
        return self._get_page(rows, number, self)


class Pagination(PageNumberPagination):
    """`?page=N&page_size=M` (at most 200); answers {count, next, previous, results}.

    Both must be whole numbers in range or the request is 400; a page past the last is 404.
    """

    django_paginator_class = OneQueryPaginator
    page_size_query_param = "page_size"
    max_page_size = 200
    last_page_strings = ()

    def get_page_size(self, request):
        return _query_int(request, self.page_size_query_param, maximum=self.max_page_size) or self.page_size

    def get_page_number(self, request, paginator):
        return _query_int(request, self.page_query_param) or 1

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
        return parameters
