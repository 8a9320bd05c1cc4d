"""Readable names of Unicode emoji groups and subgroups. [ours]

The class names of the classification datasets. The backbone's pretraining captions never use them:
they are each emoji's own words (gram/backbone.py), so that zero-shot on these names stays zero-shot.
"""


def words(slug: str) -> str:
    """Unicode group/subgroup slug -> words: 'face-smiling' -> 'face smiling'."""
    return slug.replace("-", " ").replace("&", "and")
