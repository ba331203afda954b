from django.apps import AppConfig


class ConversionConfig(AppConfig):
    name = "p2v.conversion"
    label = "p2v_conversion"
    verbose_name = "P2V conversion"
    default_auto_field = "django.db.models.BigAutoField"
