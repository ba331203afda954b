from django.apps import AppConfig


class InventoryConfig(AppConfig):
    name = "datacenter.inventory"
    label = "inventory"
    verbose_name = "Inventory"
