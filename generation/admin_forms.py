"""The admin's "Generate" form: the same fields and validation as POST /api/v1/generations."""

import json

from django import forms

from generation.methods import DEFAULT_METHOD, METHODS


class GenerateForm(forms.Form):
    method = forms.ChoiceField(choices=[(m, m) for m in METHODS], initial=DEFAULT_METHOD)
    prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), max_length=4000)
    negative_prompt = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, max_length=4000)
    width = forms.IntegerField(initial=1024, min_value=64)
    height = forms.IntegerField(initial=1024, min_value=64)
    steps = forms.IntegerField(required=False, min_value=1, help_text="Empty: the method's default")
    seed = forms.IntegerField(required=False, min_value=0, help_text="Empty: random")
    num_images = forms.IntegerField(initial=1, min_value=1)
    params = forms.CharField(
        required=False,
        initial="{}",
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text='Method parameters as JSON, e.g. {"id_weight": 1.0} or {"lora_scale": 0.8}',
    )

    def clean_params(self):
        """The JSON object as the API would parse it; `generation_submit` checks what it may hold."""
        raw = self.cleaned_data.get("params") or "{}"
        try:
            value = json.loads(raw, parse_constant=_no_constant)
        except RecursionError:
            raise forms.ValidationError("Not valid JSON: nested too deeply.") from None
        except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers of more than 4300 digits
            raise forms.ValidationError(f"Not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("Give a JSON object.")
        return value


def _no_constant(name: str):
    # Python's json accepts NaN and Infinity, which JSON (and PostgreSQL's jsonb) do not
    raise ValueError(f"{name} is not a JSON number")
