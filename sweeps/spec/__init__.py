"""Sweep specs: YAML files (sweeps/specs/*.yaml), validated completely before anything starts.

A spec names the sweep, the metric it selects on, the fixed trial settings (flat dotted keys of
`study.config`), the search space, the search algorithm, the scheduler, the seeds, the resources per
trial, and sections of overrides for its named sizes (`SIZES`): `smoke`, small enough for CI, and
`quick`, a short study for a laptop check. Every problem is a `SpecError` whose one-line message names
the file and the field.

Space entries (`when` makes an entry exist only for some values of an earlier key):

    activation.p:     {uniform: [0.0, 1.0]}
    activation.slope: {loguniform: [0.25, 4.0]}
    activation.p_ramp_steps: {int: [0, 2000]}
    model.arch:       {choice: [mlp, cnn]}             # tpe/qmc: categorical
    activation.p:     {grid: [0.0, 0.5, 1.0]}          # grid only
    model.code_bits:  {choice: [16, 64], when: {model.arch: [bottleneck]}}

A `when` names a fixed key, one the variants set, or an earlier choice/grid entry, with values that
key takes; an entry whose conditions hold in no combination is an error. A size's section
(`smoke:`, `quick:`) has the keys fixed, space, variants, search, scheduler, seeds and resources: its
fixed/space/search/scheduler/resources merge into the spec's (a key set to null is removed, e.g. an
entry the smaller space never activates); its variants and seeds replace the spec's. Loading a spec at
a size it has no section for is an error. A named size is its own sweep: experiment `NAME-SIZE`,
sweep id `NAME-SIZE-DIGEST`.

The file itself is held to what a spec is: at most 1 MB of UTF-8 text; plain YAML values (text,
numbers, true/false, null, lists, mappings: no tags such as !!python/..., dates stay text); no key
twice in a mapping; at most 100000 values once aliases are expanded, no alias that contains itself,
at most 32 levels deep; every number finite. A sweep has at most `max_trials` trials (default 1000;
a spec raises it with a top-level `max_trials: N`, up to MAX_TRIALS_LIMIT), counted without listing
them. Every other count has its maximum (MAX_*, here and in `study.config`), and data.train_size and
budget.batch_size fit the training images there are, in fixed, variants and space (at a range's ends).

The sweep id follows the spec's meaning, not its text: `SweepSpec.digest` hashes the validated
content, so comments, key order, YAML style, the description and `max_trials` leave it unchanged.

The package, by responsibility: `model` (SweepSpec, the limits, SpecError), `parts` (its
dimensions, search, scheduler, resources), `yaml_io` (reading the file), `validate` (load_spec,
parse_spec and the sections), `conditions` (the combinatorics of `when:`), `wire` (choices for
Optuna, canonical JSON and the sweep id's hash) and `checks` (the field checks they share).
Import from `sweeps.spec`; pickles name its classes there.
"""

from sweeps.spec.model import (
    ALGORITHMS,
    DISTRIBUTIONS,
    MAX_CONCURRENT,
    MAX_FAILURES,
    MAX_NAME,
    MAX_REDUCTION_FACTOR,
    MAX_TRIALS,
    MAX_TRIALS_LIMIT,
    REPEAT_INDEX,
    SCHEDULERS,
    SIZES,
    Dimension,
    Resources,
    Scheduler,
    Search,
    SpecError,
    SweepSpec,
)
from sweeps.spec.parts import AUTO
from sweeps.spec.validate import load_spec, parse_spec
from sweeps.spec.wire import decode_choice, encode_choice

__all__ = [
    "ALGORITHMS",
    "AUTO",
    "DISTRIBUTIONS",
    "MAX_CONCURRENT",
    "MAX_FAILURES",
    "MAX_NAME",
    "MAX_REDUCTION_FACTOR",
    "MAX_TRIALS",
    "MAX_TRIALS_LIMIT",
    "REPEAT_INDEX",
    "SCHEDULERS",
    "SIZES",
    "Dimension",
    "Resources",
    "Scheduler",
    "Search",
    "SpecError",
    "SweepSpec",
    "decode_choice",
    "encode_choice",
    "load_spec",
    "parse_spec",
]
