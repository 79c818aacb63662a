"""The OUT and its contract: where each file of an OUT lives (`layout`), and the one answer to "which rows are
committed, and where is each" (`snapshot`) that every reader asks; the dataset card (`card`) and the move of
format-1.x OUTs to the current layout (`migrate`).

May import: the standard library, pyarrow, vqpipe.storage and vqpipe's records, ledger, index and manifest; never
torch or Ray.
"""
