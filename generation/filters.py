import django_filters

from alkemy.jobs import JobStatus
from generation.methods import METHODS
from generation.models import GenerationJob


class GenerationFilter(django_filters.FilterSet):
    # A plain id filter: a model-choice filter would list characters outside any tenant scope.
    character = django_filters.NumberFilter(field_name="character_id", help_text="Only jobs of this character")
    status = django_filters.ChoiceFilter(choices=JobStatus.choices)
    method = django_filters.ChoiceFilter(choices=[(m, m) for m in METHODS])

    class Meta:
        model = GenerationJob
        fields = ["character", "status", "method"]
