"""Counting terms over the training rows of steps [A, B), in the exact training order, by step window.

What a model had seen "by step t" is a count over training rows ``[0, B·t)`` of its data order
(B = global batch; step n reads rows ``[B·n, B·n + B)``, ``pythia_jax.data.pipeline``). This module
reads those rows through the same ``Order`` objects the training pipeline and ``pythia-jax
batches`` use (``pythia_jax.data.orders.open_order``) and counts, per step window:

- token n-grams (``NgramCounter``): id sequences matched within each row of ``seq_len + 1`` tokens
  (an n-gram never spans two rows, as the rows were seen in training). Text terms are tokenized
  with the Pythia tokenizer twice, as written (variant ``bare``) and after a leading space
  (variant ``space``: ``" 42"`` is one token, ``"42"`` another); ``--ids`` terms are variant ``ids``.
- a regular expression over each decoded row (``RegexCounter``), per pattern or per matched text;
- the numeral rule of the Pythia paper's term-frequency study (Biderman et al. 2023, §5 / the
  ``EleutherAI/pythia`` ``case-studies`` following Razeghi et al. 2022), ``NumeralCounter``:
  an integer of 1–5 digits counts when another integer is within 1–3 words of it; counted per
  number (variant ``numeral``) and per unordered pair (variant ``numeral_pair``). See
  ``NumeralCounter`` for the exact tokenization of "integer" and "word".

Results form a tidy table, one row per (window, term, variant): ``window_start, window_end, term,
variant, count, cumulative`` where ``count`` is over steps ``[window_start, window_end)`` and
``cumulative`` over ``[first window start, window_end)``. With ``locate`` a second table lists where
terms occur: ``term, variant, step, row_in_step, offset, offset_unit, token_offset`` (``offset``:
the token offset within the row for n-grams, the character offset within the decoded row for
regex/numerals; ``token_offset``: always the token holding the match's first character).

Running (``run_count``): each finished window is written as a part file in ``OUT.parts/`` (with a
``manifest.json`` of what is counted and over which rows), so a rerun with ``resume=True`` skips
finished windows; the table is assembled from the parts and renamed into place at the end. Windows
can be spread over local processes (``workers``) and over hosts (``num_hosts``/``host_index``:
host i takes windows i, i+H, ...; each writes a shard ``OUT.host-0000i-of-0000H.json`` and
``merge_shards`` assembles the same table a single host would write).

The rows come from one ``RunData`` (data prefix, order, seq_len, global batch, seed, train_iters),
so a run's recorded data configuration can fill it directly.

Modules: ``spec`` (what is counted, windows), ``counters``, ``decoder`` (decoding and counting
rows), ``files`` (manifest, parts, tables, merging host shards), ``runner`` (``run_count`` and its
workers); this package re-exports them.
"""

from pythia_jax.data.count.counters import (
    INTEGER_RE,
    WORD_START_RE,
    Key,
    NgramCounter,
    NumeralCounter,
    RegexCounter,
    _pack,
    build_counters,
    compile_regex,
    fixed_keys,
)
from pythia_jax.data.count.decoder import ByteDecoder, _token_of_char, as_uint16, count_rows, decode_rows
from pythia_jax.data.count.files import (
    _location_rows,
    _manifest_difference,
    _natural_key,
    _part_name,
    _render,
    _table_rows,
    assemble,
    check_count_outputs,
    locations_path,
    make_manifest,
    merge_shards,
    output_format,
    read_table,
    shard_path,
    work_dir,
)
from pythia_jax.data.count.runner import (
    _count_chunk,
    _init_worker,
    _load_parts,
    _merge_chunks,
    _progress_bar,
    _run_tasks,
    chunk_tasks,
    run_count,
)
from pythia_jax.data.count.spec import (
    DEFAULT_CHUNK_TOKENS,
    LOCATION_COLUMNS,
    MANIFEST_VERSION,
    OUTPUT_EXTENSIONS,
    TABLE_COLUMNS,
    CountError,
    CountSpec,
    make_windows,
    parse_ids,
    steps_available,
)
from pythia_jax.data.run_data import RunData  # the counting API takes one
