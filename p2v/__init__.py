"""P2V: assess physical machines over SSH and convert them into libvirt virtual machines."""
