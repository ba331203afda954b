from django.apps import AppConfig


class LoadBalancingConfig(AppConfig):
    name = "datacenter.loadbalancing"
    label = "loadbalancing"
    verbose_name = "Load balancing"
