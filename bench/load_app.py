"""The bench-only parts of `bench/load_settings.py`: the query-count middleware and the floor view."""

import os

from django.db import connection
from django.urls import include, path
from rest_framework.response import Response
from rest_framework.views import APIView


class QueryCountMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        count = [0]

        def counter(execute, sql, params, many, context):
            count[0] += 1
            return execute(sql, params, many, context)

        with connection.execute_wrapper(counter):
            response = self.get_response(request)
        response["X-Bench-Queries"] = str(count[0])
        response["X-Bench-Pid"] = str(os.getpid())
        return response


class FloorView(APIView):
    """Authenticate the API key (default authentication and IsAuthenticated), answer a constant."""

    def get(self, request):
        return Response({"ok": True})


urlpatterns = [path("bench/floor", FloorView.as_view()), path("", include("alkemy.urls"))]
handler400 = "alkemy.api.errors.handler400"
handler404 = "alkemy.api.errors.handler404"
handler500 = "alkemy.api.errors.handler500"
