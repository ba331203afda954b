"""The stand-in physical machine for P2V tests: `machine.py` (sshd in namespaces, one loop disk, fake
health tools; `start_standin()`, `standin_fixture()`) and `image.py` (its bootable BIOS/UEFI disk)."""
