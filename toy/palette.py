"""The toy world's colors and the two image measurements built on them.

Shared by the toy world: rendering, the red user, and its two scorers (toy/scorers.py).
Images are PIL images or HxWx3 arrays; arrays with values above 1 are taken as 0..255.
"""
import numpy as np

# caption word -> RGB in 0..255; far apart so that a sample's color is unambiguous
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
}


def to_array(image):
    """HxWx3 float array in [0, 1]."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    return a / 255.0 if a.max() > 1.0 else a


def redness(image):
    """The red user's reward (KTO paper, appendix C): mean of the red channel minus the mean over channels."""
    a = to_array(image)
    return float(a[..., 0].mean() - a.mean())


def caption_color(caption):
    """The first color word of a caption, or None."""
    for word in caption.lower().replace(",", " ").split():
        if word in COLORS:
            return word
    return None


def dominant_color(image, threshold=0.15):
    """The palette color nearest to the mean of the foreground pixels, or None if there is none.

    The foreground is every pixel farther than `threshold` (RGB distance in [0, 1] units) from the
    image's per-channel median, which is the background because shapes cover less than half the image.
    """
    a = to_array(image).reshape(-1, 3)
    background = np.median(a, axis=0)
    fg = a[np.linalg.norm(a - background, axis=1) > threshold]
    if len(fg) == 0:
        return None
    mean = fg.mean(axis=0)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32) / 255.0
    return names[int(np.argmin(np.linalg.norm(palette - mean, axis=1)))]
