"""TextualDegRemoval (Lin et al., CVPR 2024): guided restoration (the image half)."""
