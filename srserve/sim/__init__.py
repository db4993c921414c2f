"""Simulated GPU pools and capacity planning: the cost table (`costs`), the switch-step distribution (`switching`),
the capacity planner (`plan`) and the simulated model family's settings (`spec`). Torch-free, like the ingress."""
