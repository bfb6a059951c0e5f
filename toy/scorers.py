"""The toy world's two scorers, in the form evaluate.py and filter_fifa.py take a user's own function:
score(images, prompts) -> one number per image.

    python evaluate.py ... --scorers toy.scorers:redness,toy.scorers:color_acc
    python filter_fifa.py ... --reward_model toy.scorers:redness
"""
import numpy as np

from toy.palette import caption_color, dominant_color
from toy.palette import redness as image_redness


def redness(images, prompts):
    """The red user's reward (KTO paper, appendix C): mean of the red channel minus the mean over channels.
    The prompt is not used."""
    return np.array([image_redness(im) for im in images])


def color_acc(images, prompts):
    """Caption accuracy: 1 if the image's dominant color is the caption's color, else 0; nan when the caption
    names no color, so that such prompts are left out of its mean and win rates."""
    return np.array([float(dominant_color(im) == caption_color(p)) if caption_color(p) else float("nan")
                     for im, p in zip(images, prompts)])
