"""The models: Phi, CLIP and their LLaVA assembly, the precision policy (device and dtype), generation, and the
speech recogniser."""
