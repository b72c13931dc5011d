"""Head profiling: VHD vision sensitivity, VAR sink dimensions and image-centric heads, GIFT saliency layer."""
