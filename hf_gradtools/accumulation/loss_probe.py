"""Measure how a loss is normalised, so that gradient accumulation can weight it exactly, or know that it cannot.

A loss that is a mean over some items (`accumulation.ItemRule`) is additive in a known way: split a batch in two
parts A and B, and `L(A+B) * c(A+B) = L(A) * c(A) + L(B) * c(B)` where `c` counts the items; a summed loss gives
`L(A+B) = L(A) + L(B)`. `probe_loss_normalization` evaluates the loss (in eval mode, without gradients) on such
splits of a window and keeps the rules the numbers agree with:

- the row probe splits the rows of a micro-batch (or joins two one-row micro-batches of equal shapes); it tests
  every rule. The same split is tried again with one label of a row ignored, so that token and sample rules count
  the parts in different proportions even where every row holds as many labels;
- the position probe keeps the even label positions of each row, then the odd ones (the rest set to the ignore
  index); it tests the token rules;
- the position-0 test tells a causal LM's shifted loss (position 0 never a target) from an unshifted one by what
  the loss does, not by the model's class: it changes the labels at position 0 (ignores those that are set, and
  gives the others a label of their row) and a shifted loss stays bit-identical. It runs on every window, also
  one whose rows never label position 0;
- for a loss that divides by `num_items_in_batch`, the count it divides by when given none (`own_counts`, from
  `probe_count_response`) is compared with each rule's count: an exact test of every rule, also on one row.

The first rule in priority order (shifted token, token, element, sample, sum) that passes every probe it was put
to wins. No rule is established (the result is `None` and the caller keeps the Trainer's own scaling) when none
passes, when two pass with equal evidence but would weight the window differently, or when a rule that would
weight it differently could not be tested at all (one-row micro-batches of different lengths cannot be split).

`split_gradient_error` then measures what the loss values cannot show: how far the gradient that accumulation
combines from the parts of a split batch is from the gradient of the whole (`EXACT` or less is float32 rounding).

`probe_count_response` measures how the loss answers `num_items_in_batch`, the Trainer's contract ("sum, then
divide by `num_items_in_batch` when given"): it divides by it, ignores it, or mixes both (a part that does not
divide, such as a router's auxiliary loss).

Example:
    >>> import torch
    >>> def mean_loss(batch):  # a per-token mean, as masked LM heads compute it
    ...     labels = batch["labels"]
    ...     return (batch["x"] * labels.ne(-100)).sum() / labels.ne(-100).sum()
    >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    >>> labels = torch.tensor([[1, 1, -100], [1, 1, 1]])
    >>> probe_loss_normalization(mean_loss, [{"x": x, "labels": labels}]).rule.name
    'token'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .weights import (
    ELEMENT,
    IGNORE_INDEX,
    SAMPLE,
    SHIFTED_TOKEN,
    SUM,
    TOKEN,
    ItemRule,
    batch_rows,
    count_items,
    label_tensor,
)

MAX_PROBE_BATCHES = 4  # micro-batches tried per probe before the window counts as inconclusive
DECISIVE = 10.0  # a rival rule must fit at least this many times worse than the chosen one
EXACT = 5e-6  # a relative gradient error at or below this is float32 rounding: accumulation is exact
GRADIENT_DIRECTIONS = 4  # fixed random directions a gradient is projected on to compare it with another


def project_on_random_signs(
    grads: Sequence[torch.Tensor | None], directions: int = GRADIENT_DIRECTIONS, seed: int = 0
) -> torch.Tensor:
    """The dot products of a gradient (one tensor per parameter, `None` for none) with fixed random +-1 vectors.

    Parameter i's signs come from seed `(seed, i)`, so projections of different batches compare, also where a
    parameter has no gradient in one of them; nothing of the gradient's size is kept beyond one parameter. Two
    gradients whose difference is large relative to them project apart, whatever its direction, with high
    probability: the squared projection's mean is the squared norm.

    Returns:
        A float64 tensor of `directions` values, on the CPU (read once, at the end).
    """
    totals: dict[torch.device, torch.Tensor] = {}
    generators: dict[torch.device, torch.Generator] = {}
    for i, grad in enumerate(grads):
        if grad is None:
            continue
        if grad.device not in generators:
            generators[grad.device] = torch.Generator(grad.device)
            totals[grad.device] = torch.zeros(directions, dtype=torch.float64, device=grad.device)
        generator = generators[grad.device]
        generator.manual_seed(seed * 1_000_003 + i)
        for k in range(directions):
            signs = torch.randint(0, 2, grad.shape, generator=generator, device=grad.device, dtype=torch.uint8)
            totals[grad.device][k] += torch.where(signs.bool(), grad, -grad).sum(dtype=torch.float64)
    return sum((total.cpu() for total in totals.values()), torch.zeros(directions, dtype=torch.float64))


def describe_error(error: float | None, unmeasured: str = "no micro-batch could be split") -> str:
    """How close accumulation's gradient comes to one batch's, for the log: "exactly" only at float32 rounding."""
    if error is None:
        return f"(how closely was not measured: {unmeasured})"
    if error <= EXACT:
        return f"exactly (gradient measured to {error:.0e} of one batch's)"
    return f"within {error:.1e} of one batch's gradient (relative, measured on a split micro-batch)"


@dataclass
class ProbeResult:
    """The measured rule (`None`: not established) and one sentence on how it was decided, for the log."""

    rule: ItemRule | None
    reason: str
    conclusive: bool = True  # False: these micro-batches could not tell; a later window may


@dataclass
class CountResponse:
    """How a loss answers `num_items_in_batch` (see `probe_count_response`).

    Attributes:
        kind: "divides" (a sum divided by the count: the Trainer's contract), "ignores" (the same loss whatever the
            count), "mixed" (neither: a part of the loss does not divide), or "unknown" (no finite, non-zero loss).
        own_counts: for "divides": `(batch, n)` pairs, `n = c * L(batch, c) / L(batch, None)`: the count the loss
            divides by when it is given none, times the factor the Trainer applies to a loss given a count.
    """

    kind: str
    own_counts: list[tuple[Mapping, float]]


def candidate_rules(
    batch: Mapping, ignore_indices: Sequence[int] = (), label_key: str | None = None
) -> list[ItemRule]:
    """The rules that could describe a loss over `batch`, in priority order.

    `ignore_indices`: label values other than -100 that a head ignores (e.g. `semantic_loss_ignore_index`).
    `label_key`: the batch key of the labels when it is not `labels`.
    """
    labels = label_tensor(batch, label_key)
    rules: list[ItemRule] = []
    if labels is not None and not labels.is_floating_point():
        if labels.dim() >= 2 and "shift_labels" not in batch:
            rules.append(SHIFTED_TOKEN)
        rules += [ItemRule("token", ignore_index=i) for i in ignore_indices if i != IGNORE_INDEX]
        rules.append(TOKEN)
    if labels is not None and labels.is_floating_point():
        rules.append(ELEMENT)
    return [dataclasses.replace(rule, label_key=label_key) for rule in rules + [SAMPLE, SUM]]


def split_rows(batch: Mapping, k: int) -> tuple[dict, dict] | None:
    """Rows `[:k]` and `[k:]` of every tensor of `batch`; `None` when a tensor is not laid out by rows."""
    rows = batch_rows(batch)
    first, second = {}, {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != rows:
                return None
            first[key], second[key] = value[:k], value[k:]
        else:
            first[key] = second[key] = value
    return first, second


def join_rows(a: Mapping, b: Mapping) -> dict | None:
    """Two micro-batches as one, when they hold the same keys and tensors of the same trailing shapes."""
    if a.keys() != b.keys():
        return None
    joined = {}
    for key, value in a.items():
        other = b[key]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if not isinstance(other, torch.Tensor) or value.shape[1:] != other.shape[1:]:
                return None
            joined[key] = torch.cat([value, other])
        elif isinstance(value, torch.Tensor) or value != other:
            return None
        else:
            joined[key] = value
    return joined


def mask_positions(batch: Mapping, keep_even: bool, ignore_index: int, label_key: str | None = None) -> dict:
    """`batch` with the odd (or even) label positions of each row set to `ignore_index`.

    Interleaved halves give both halves targets whenever a row has two or more, wherever they sit in the row.
    """
    key = label_key or ("shift_labels" if isinstance(batch.get("shift_labels"), torch.Tensor) else "labels")
    labels = batch[key]
    flat = labels.reshape(labels.shape[0], -1).clone()
    flat[:, 1 if keep_even else 0 :: 2] = ignore_index
    return {**batch, key: flat.reshape(labels.shape)}


JoinRows = Callable[[Mapping, Mapping], "dict | None"]


def _row_probe_batches(batches: Sequence[Mapping], allow_join: bool, join: JoinRows = join_rows) -> list[Mapping]:
    """Batches of two or more rows to split: the micro-batches, else pairs of one-row micro-batches joined."""
    found = [b for b in batches if batch_rows(b) > 1]
    if allow_join:
        pairs = (join(a, b) for a, b in zip(batches[::2], batches[1::2], strict=False))
        found += [j for j in pairs if j is not None]
    return found


def _error(rule: ItemRule, whole: float, parts: Sequence[tuple[float, Mapping]]) -> float | None:
    """Relative distance between `whole` and what `rule` predicts from the parts' losses (`None`: cannot tell)."""
    if rule.kind == "sum":
        predicted = sum(loss for loss, _ in parts)
    else:
        counts = [float(count_items(batch, rule)) for _, batch in parts]
        if min(counts) <= 0:
            return None
        predicted = sum(loss * c for (loss, _), c in zip(parts, counts, strict=True)) / sum(counts)
    scale = max(abs(whole), *(abs(loss) for loss, _ in parts), 1e-12)
    return abs(predicted - whole) / scale


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _tells_apart(rules: Sequence[ItemRule], parts: Sequence[Mapping]) -> bool:
    """Whether the mean rules among `rules` count the parts in different proportions (so a probe tells them apart)."""
    shares = set()
    for rule in rules:
        if rule.kind != "sum":
            counts = [float(count_items(part, rule)) for part in parts]
            shares.add(tuple(round(c / max(sum(counts), 1.0), 9) for c in counts))
    return len(shares) > 1


def _single_rows(batch: Mapping) -> list[dict]:
    """Each row of `batch` as a batch of its own (none when the batch is not laid out by rows)."""
    rows, singles, rest = batch_rows(batch), [], batch
    for _ in range(rows - 1):
        split = split_rows(rest, 1)
        if split is None:
            return []
        singles.append(split[0])
        rest = split[1]
    return singles + [rest] if rows > 1 else []


def _weights_differ(a: ItemRule, b: ItemRule, batches: Sequence[Mapping]) -> bool:
    """Whether rules `a` and `b` would weight the micro-batches (or the rows) of `batches` differently."""
    if (a.kind == "sum") != (b.kind == "sum"):
        return True
    units = list(batches) + [row for batch in batches for row in _single_rows(batch)]
    ca = torch.tensor([float(count_items(u, a)) for u in units], dtype=torch.float64)
    cb = torch.tensor([float(count_items(u, b)) for u in units], dtype=torch.float64)
    return not torch.allclose(ca / ca.sum().clamp_min(1), cb / cb.sum().clamp_min(1), rtol=1e-9, atol=1e-12)


def _label_key(batch: Mapping, label_key: str | None) -> str:
    return label_key or ("shift_labels" if isinstance(batch.get("shift_labels"), torch.Tensor) else "labels")


def drop_one_label(batch: Mapping, ignore_index: int, label_key: str | None = None) -> dict | None:
    """`batch` with the last label of its row with the most labels set to `ignore_index`, when that row holds two or
    more (`None` otherwise): token rules then count that row, and the part that holds it, apart from the sample rule.
    """
    key = _label_key(batch, label_key)
    labels = batch[key]
    flat = labels.reshape(labels.shape[0], -1)
    targets = flat.ne(IGNORE_INDEX) & flat.ne(ignore_index)
    counts = targets.sum(1)
    row = int(counts.argmax())
    if flat.shape[1] < 2 or int(counts[row]) < 2:
        return None
    edited = flat.clone()
    edited[row, int(targets[row].nonzero().max())] = ignore_index
    return {**batch, key: edited.reshape(labels.shape)}


def toggle_position_zero(labels: torch.Tensor) -> torch.Tensor | None:
    """`labels` with position 0 of each row changed: ignored where it is a target, else given the row's first target
    (`None` when nothing changes). A shifted loss never reads position 0, so it stays bit-identical."""
    targets = labels.ne(IGNORE_INDEX)
    first = targets.int().argmax(-1, keepdim=True)  # the first target of each row (0 when there is none)
    donor = labels.gather(-1, first).squeeze(-1)
    zero = labels[..., 0]
    edited = labels.clone()
    edited[..., 0] = torch.where(targets[..., 0], torch.full_like(zero, IGNORE_INDEX), donor)
    return None if torch.equal(edited, labels) else edited


def _split_errors(loss_of, rules, batch, k) -> tuple[list[float | None], list[Mapping]] | None:
    """Each rule's error on rows `[:k]` and `[k:]` of `batch`, and the parts (`None`: not split, or not finite)."""
    split = split_rows(batch, k)
    if split is None:
        return None
    whole = loss_of(batch)
    losses = [(loss_of(part), part) for part in split]
    if not _finite(whole, *(loss for loss, _ in losses)):
        return None
    return [_error(rule, whole, losses) for rule in rules], list(split)


def probe_count_response(
    loss_with: Callable[[Mapping, object], float],
    batches: Sequence[Mapping],
    count,
    rtol: float = 1e-5,
    reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> CountResponse:
    """How the loss answers `num_items_in_batch`: `loss_with(batch, n)` is the loss given the count `n` (or none).

    The loss of one micro-batch given `count` and `2 * count`: half as large, it divides by the count; the same, it
    ignores it; else it mixes both. For a loss that divides, the count it divides by when given none is measured on
    each micro-batch tried.

    Args:
        loss_with: the loss of one batch given a count (`None`: no count), deterministic (eval mode, no gradients).
        batches: the micro-batches of one window (at least one).
        count: a positive count to pass, such as the Trainer's `num_items_in_batch` of the window.
        rtol: relative tolerance of "half as large" and "the same".
        reduce_max: element-wise max over data-parallel processes, so that every process decides alike.
    """
    value = float(count.reshape(-1)[0]) if isinstance(count, torch.Tensor) else float(count)
    attempts = MAX_PROBE_BATCHES if reduce_max is None else 1
    gaps = torch.full((2,), math.inf, dtype=torch.float64)  # |r - 1|, |2r - 1| (r: the ratio of the two losses)
    own: list[tuple[Mapping, float]] = []
    for batch in batches[:attempts]:
        given, doubled, none = loss_with(batch, count), loss_with(batch, count * 2), loss_with(batch, None)
        if _finite(given, doubled, none) and given != 0:
            if not math.isfinite(float(gaps[0])):
                ratio = doubled / given
                gaps[0], gaps[1] = abs(ratio - 1), abs(2 * ratio - 1)
            if none != 0:
                own.append((batch, value * given / none))
    if reduce_max is not None:
        gaps = reduce_max(gaps)
    if float(gaps[0]) <= rtol:
        return CountResponse("ignores", [])
    if float(gaps[1]) <= rtol:
        return CountResponse("divides", own)
    return CountResponse("mixed" if math.isfinite(float(gaps[1])) else "unknown", [])


def split_gradient_error(
    project: Callable[[Mapping, object], torch.Tensor | None],
    batches: Sequence[Mapping],
    rule: ItemRule | None,
    count=None,
    allow_join: bool = True,
    join: JoinRows = join_rows,
) -> float | None:
    """How far accumulation's gradient is from one batch's, measured on a split of the rows, relative.

    `project(batch, count)` is the gradient of the loss of `batch` (given `count`, or none) along a few fixed
    directions (`None`: no gradient). The parts' projections are combined as accumulation combines micro-batches:
    weighted by `rule`, or, with `rule` `None`, given the same `count` and added (the Trainer's scaling of a loss
    that takes the count). The loss values alone cannot tell: a router's auxiliary loss can add up to 1e-7 while
    its gradient does not.

    Returns:
        The relative distance between the combined projection and the whole batch's; `None` when no batch splits.
    """
    for batch in _row_probe_batches(batches, allow_join, join)[:1]:
        split = split_rows(batch, batch_rows(batch) // 2)
        if split is None:
            return None
        whole = project(batch, count)
        parts = [project(part, count) for part in split]
        if whole is None or any(part is None for part in parts):
            return None
        if rule is None or rule.kind == "sum":
            combined = sum(parts)
        else:
            counts = [float(count_items(part, rule)) for part in split]
            if min(counts) <= 0:
                return None
            combined = sum(c * p for c, p in zip(counts, parts, strict=True)) / sum(counts)
        error = float((combined - whole).norm() / whole.norm().clamp_min(1e-30))
        return error if math.isfinite(error) else None
    return None


def probe_loss_normalization(
    loss_of: Callable[[Mapping], float],
    batches: Sequence[Mapping],
    ignore_indices: Sequence[int] = (),
    rtol: float = 2e-4,
    reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    allow_join: bool = True,
    label_key: str | None = None,
    own_counts: Sequence[tuple[Mapping, float]] = (),
    count_multipliers: Sequence[float] = (1.0,),
    join: JoinRows = join_rows,
) -> ProbeResult:
    """Measure which `ItemRule` the loss `loss_of(batch)` follows, from the micro-batches of one window.

    Args:
        loss_of: the loss of one batch as a float, deterministic (eval mode, no gradients).
        batches: the micro-batches of the window (at least one).
        ignore_indices: label values other than -100 that the head ignores, tried as token rules.
        rtol: relative tolerance of the additivity checks (looser for half-precision models).
        reduce_max: element-wise max over data-parallel processes, so that every process decides alike.
        allow_join: join two one-row micro-batches for the row probe (off under data parallelism, where the
            processes must run the same number of forward passes).
        label_key: the batch key of the labels when it is not `labels` (the Trainer's `label_names`).
        own_counts: `CountResponse.own_counts` of a loss that divides by `num_items_in_batch`.
        count_multipliers: the factors an own count may carry (the Trainer multiplies a loss given a count by the
            number of processes when it averages tokens across them).
        join: how two one-row micro-batches become one batch of two rows (`join_rows`: when their shapes agree;
            the trainer also pads them with its data collator).

    Returns:
        `ProbeResult` with the rule, or `None` and the reason it could not be established.
    """
    rules = candidate_rules(batches[0], ignore_indices, label_key)
    errors = torch.full((len(rules),), -1.0, dtype=torch.float64)  # -1: not tested; else the largest error seen
    token_rules = [i for i, rule in enumerate(rules) if rule.kind == "token"]
    ignores = list(dict.fromkeys(rules[i].ignore_index for i in token_rules))

    def record(i: int, error: float | None) -> None:
        if error is not None:
            errors[i] = max(float(errors[i]), error)

    # Under data parallelism every process must run the same forward passes: one try each.
    attempts = MAX_PROBE_BATCHES if reduce_max is None else 1
    row_done = position_done = False
    for batch in _row_probe_batches(batches, allow_join, join)[:attempts]:
        rows = batch_rows(batch)
        for k in dict.fromkeys([rows // 2, 1, rows - 1][:attempts]):
            measured = _split_errors(loss_of, rules, batch, k)
            if measured is None:
                continue
            for i, error in enumerate(measured[0]):
                record(i, error)
            row_done = _tells_apart(rules, measured[1])
            # Rows of equal label counts cannot tell token from sample: one label fewer in one row can.
            for ignore in ignores:
                edited = drop_one_label(batch, ignore, label_key)
                try:
                    measured = _split_errors(loss_of, rules, edited, k) if edited is not None else None
                except (RuntimeError, ValueError, IndexError):  # an ignore value the head does not accept
                    continue
                if measured is not None:
                    for i, error in enumerate(measured[0]):
                        if rules[i].kind != "token" or rules[i].ignore_index == ignore:
                            record(i, error)
                    row_done = row_done or _tells_apart(rules, measured[1])
            break
        if row_done:
            break

    for batch in batches[:attempts] if token_rules else ():
        labels = label_tensor(batch, label_key)
        if labels is None or labels[0].numel() < 2:
            break
        whole = loss_of(batch)
        for ignore in ignores:
            halves = [mask_positions(batch, even, ignore, label_key) for even in (True, False)]
            try:
                losses = [(loss_of(half), half) for half in halves]
            except (RuntimeError, ValueError, IndexError):  # an ignore value the head does not accept as a label
                continue
            if _finite(whole, *(loss for loss, _ in losses)):
                position_done = position_done or _tells_apart([rules[i] for i in token_rules], halves)
                for i in token_rules:
                    if rules[i].ignore_index == ignore:
                        record(i, _error(rules[i], whole, losses))
        if position_done:
            break

    shifted = dataclasses.replace(SHIFTED_TOKEN, label_key=label_key)
    shift = rules.index(shifted) if shifted in rules else None
    if shift is not None:
        # Exact test: does position 0 take part in the loss? A shifted loss never reads it.
        unshifted = rules.index(dataclasses.replace(TOKEN, label_key=label_key))
        for batch in batches[:attempts]:
            key = _label_key(batch, label_key)
            edited = toggle_position_zero(batch[key])
            if edited is None:
                continue
            whole = loss_of(batch)
            try:
                changed = loss_of({**batch, key: edited})
            except (RuntimeError, ValueError, IndexError):  # the head does not accept -100 as a label
                break
            if _finite(whole, changed):
                change = abs(whole - changed) / max(abs(whole), 1e-12)
                record(shift, 0.0 if change <= 1e-7 else math.inf)
                record(unshifted, math.inf if change <= 1e-7 else 0.0)
            break

    for batch, own in own_counts:  # exact: the count a loss divides by is some rule's count, or none's
        for i, rule in enumerate(rules):
            items = 1.0 if rule.kind == "sum" else float(count_items(batch, rule))
            if items > 0:
                record(i, min(abs(own / m - items) for m in count_multipliers) / items)

    if reduce_max is not None:
        errors = reduce_max(errors)
    tested = [i for i in range(len(rules)) if errors[i] >= 0]
    accepted = sorted((i for i in tested if errors[i] <= rtol), key=lambda i: (float(errors[i]), i))
    if not accepted:
        if not tested:
            why = "its micro-batches cannot be split into parts that each hold an item"
            return ProbeResult(None, f"the window cannot measure it: {why}", conclusive=False)
        return ProbeResult(None, "no normalisation (token, shifted_token, sample, element, sum) fits the measurements")
    chosen = accepted[0]
    # A rival that would weight the window differently must fit the numbers clearly worse than the chosen rule,
    # and one that no probe could test is no weaker than the chosen rule.
    rivals = [
        i
        for i in accepted[1:]
        if errors[i] < DECISIVE * max(float(errors[chosen]), 1e-9)
        and _weights_differ(rules[chosen], rules[i], batches)
    ]
    untested = [i for i in range(len(rules)) if errors[i] < 0 and _weights_differ(rules[chosen], rules[i], batches)]
    conflict = torch.tensor([float(bool(rivals)), float(bool(untested))], dtype=torch.float64)
    if reduce_max is not None:
        conflict = reduce_max(conflict)
    if conflict[0].item() > 0:
        names = ", ".join(rules[i].name for i in [chosen] + rivals)
        return ProbeResult(None, f"the window cannot tell {names} apart", conclusive=False)
    if conflict[1].item() > 0:
        names = ", ".join(rules[i].name for i in untested) or "rules other processes could not test"
        return ProbeResult(
            None,
            f"the window fits {rules[chosen].name} but cannot test {names}, which would weight it differently "
            "(one-row micro-batches of different shapes cannot be joined into a batch to split)",
            conclusive=False,
        )
    labels = label_tensor(batches[0], label_key)
    per = "label (one a row)" if rules[chosen].kind == "token" and labels is not None and labels.dim() == 1 else None
    return ProbeResult(rules[chosen], f"per {per or rules[chosen].name}")
