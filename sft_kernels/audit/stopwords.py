"""English stop words for the audit's content-word metric: shipped with the package, nothing downloads.

Function words, pronouns, auxiliaries, determiners and the clitic pieces the MiniLM (BERT uncased)
tokenizer splits off ("n't" -> "n", "'", "t"; "'s" -> "'", "s"); lower case.  A word of a sentence
is a *content word* when it is not in :data:`STOP_WORDS` and holds a letter or a digit (so
punctuation is not content either); :mod:`.text` applies the rule to wordpieces.

Knows nothing but the list.
"""
from __future__ import annotations

__all__ = ["STOP_WORDS"]

#: 163 words.
STOP_WORDS: frozenset[str] = frozenset((
    'a', 'about', 'above', 'after', 'again', 'against', 'ain', 'all', 'also', 'am', 'an', 'and',
    'any', 'are', 'aren', 'as', 'at', 'be', 'because', 'been', 'before', 'being', 'below', 'between',
    'both', 'but', 'by', 'can', 'could', 'couldn', 'd', 'did', 'didn', 'do', 'does', 'doesn',
    'doing', 'don', 'down', 'during', 'each', 'few', 'for', 'from', 'further', 'had', 'hadn', 'has',
    'hasn', 'have', 'haven', 'having', 'he', 'her', 'here', 'hers', 'herself', 'him', 'himself', 'his',
    'how', 'i', 'if', 'in', 'into', 'is', 'isn', 'it', 'its', 'itself', 'just', 'll',
    'm', 'ma', 'may', 'me', 'might', 'mightn', 'more', 'most', 'must', 'mustn', 'my', 'myself',
    'needn', 'no', 'nor', 'not', 'now', 'o', 'of', 'off', 'on', 'once', 'one', 'only',
    'or', 'other', 'our', 'ours', 'ourselves', 'out', 'over', 'own', 're', 's', 'same', 'shall',
    'shan', 'she', 'should', 'shouldn', 'so', 'some', 'such', 't', 'than', 'that', 'the', 'their',
    'theirs', 'them', 'themselves', 'then', 'there', 'these', 'they', 'this', 'those', 'through', 'to', 'too',
    'under', 'until', 'up', 'us', 've', 'very', 'was', 'wasn', 'we', 'were', 'weren', 'what',
    'when', 'where', 'which', 'while', 'who', 'whom', 'why', 'will', 'with', 'won', 'would', 'wouldn',
    'y', 'yet', 'you', 'your', 'yours', 'yourself', 'yourselves',
))
