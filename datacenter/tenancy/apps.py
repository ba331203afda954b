from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "datacenter.tenancy"
    label = "tenancy"
    verbose_name = "Tenancy"
