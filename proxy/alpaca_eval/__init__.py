"""AlpacaEval 2.0 generation: answers for every instruction, resumable, shardable.

`w2s alpaca-eval --config FILE --output DIR` answers AlpacaEval's 805 instructions with the
configured upstream and guidance and writes `DIR/model_outputs.json` in the format the
`alpaca_eval` judge reads. The parts, one job each:

    dataset.py     instructions from the hub or a user's JSON/JSONL file; --limit and --shard
    identity.py    the generator name and the fingerprint of what shapes the answers
    checkpoint.py  the append-only record of finished and failed items (resume)
    policy.py      permanent vs retryable failures; --on-too-long for instructions too long for the guide
    progress.py    the text progress bar on stderr
    runner.py      the generation loop: every pending item through the guided client, to the checkpoint
    outputs.py     model_outputs.json and summary.json: their models, atomic writes
    merge.py       joining shard outputs with checks that nothing is missing or doubled
    cli.py         the `w2s alpaca-eval` subcommand
"""
from proxy.alpaca_eval.dataset import Instruction, Selection, load_instructions, select
from proxy.alpaca_eval.identity import generator_name
from proxy.alpaca_eval.merge import merge_shards
from proxy.alpaca_eval.outputs import RunSummary
from proxy.alpaca_eval.runner import run_alpaca_eval

__all__ = ["Instruction", "RunSummary", "Selection", "generator_name", "load_instructions", "merge_shards",
           "run_alpaca_eval", "select"]
