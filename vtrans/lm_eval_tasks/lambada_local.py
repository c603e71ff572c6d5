"""Data of the ``lambada_local`` task (lm-eval loads this file by path from ``lambada_local.yaml``)."""

from __future__ import annotations


def docs(**_: object):
    """The ``test`` split: :func:`vtrans.lm_eval.lambada_local_docs` as a Hugging Face dataset (lm-eval passes the
    task's metadata as keyword arguments; none is used)."""
    import datasets

    from vtrans.lm_eval import lambada_local_docs

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(lambada_local_docs())})
