import django_filters

from alkemy.api.filters import StrictBooleanFilter
from characters.models import Character


class CharacterFilter(django_filters.FilterSet):
    tag = django_filters.CharFilter(method="filter_tag", help_text="Only characters carrying this tag.")
    archived = StrictBooleanFilter(
        field_name="is_archived", help_text="true: only archived; false: only active; omitted: both."
    )

    class Meta:
        model = Character
        fields = ["tag", "archived"]

    def filter_tag(self, queryset, name, value):
        return queryset.filter(tags__contains=[value.strip().lower()])
