"""The API speaks JSON only, whatever the client asks for.

DRF's browsable HTML renderer re-queried the view after the handler returned, when the tenant
scope was already closed, so `?format=api` or `Accept: text/html` answered 500 on every list.
Our views now have a single renderer (JSON, `REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"]`), and a
view with a single renderer has nothing to negotiate: `Accept` and `?format=` are ignored and
the answer is in that renderer (file downloads are `FileResponse`s, never rendered). Views that
offer several renderers (the OpenAPI schema: YAML or `?format=json`) negotiate as usual.
"""

from rest_framework.negotiation import DefaultContentNegotiation


class SingleRendererNegotiation(DefaultContentNegotiation):
    def select_renderer(self, request, renderers, format_suffix=None):
        if len(renderers) == 1:
            return renderers[0], renderers[0].media_type
        return super().select_renderer(request, renderers, format_suffix)
