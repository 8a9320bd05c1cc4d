"""Readable names of Unicode emoji groups and subgroups. [ours]

One function for the class names of the classification datasets and for the words of the backbone's
pretraining captions: zero-shot prompts are only fair if both spell a subgroup the same way.
"""


def words(slug: str) -> str:
    """Unicode group/subgroup slug -> words: 'face-smiling' -> 'face smiling'."""
    return slug.replace("-", " ").replace("&", "and")
