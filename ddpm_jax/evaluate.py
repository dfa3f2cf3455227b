"""Evaluation of a trained run: sample from its EMA parameters and score the samples.

``Evaluator(load_run(workdir))`` samples ``N`` images with a chosen sampler, number of steps and
classifier-free guidance scale (sharded over all devices, see :class:`ddpm_jax.train.Sampler`) and
compares their features with reference statistics of the dataset's training split:

- digits: features of a small classifier trained on the training split
  (:mod:`ddpm_jax.digits_classifier`): digits-FID, digits-KID, and the class accuracy of
  class-conditional samples (the classifier's prediction against the requested class);
- any other dataset: the FID Inception network (:func:`ddpm_jax.metrics.inception_from_pth`):
  FID, KID and the Inception Score.

Reference statistics (mean, covariance, count, the extractor's name and a subset of the features
for KID) are computed once per dataset, split and extractor and cached as ``.npz`` in
``cache_dir``. :meth:`Evaluator.floor` scores the held-out test split the same way (the value a
perfect model would get, up to the sample size). :func:`sweep` runs the metrics against the number
of steps for each method and against the guidance scale, and :func:`write_sweep` writes them as
JSON, Markdown tables and PNG line plots (:func:`line_plot`, PIL only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ddpm_jax import data, images, metrics, samplers
from ddpm_jax import digits_classifier as digits_lib
from ddpm_jax.train import LoadedRun

_EVAL_TAG = 2_000_000_004  # fold_in tag of the evaluation key (above train.py's tags)
_KID_REFERENCE_ROWS = 5000  # reference features kept in the cache for KID
_REFERENCE_BATCH = 500


# ----------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class Extractor:
    """A feature extractor for FID / KID.

    Attributes:
      name: identifies the network and its weights (part of the cache file name).
      dim: feature dimension D.
      fn: ``fn(images uint8 [N, H, W, C]) -> (features [N, D], probs [N, K])``.
      classes: True when ``probs`` are over the dataset's classes (class accuracy), False when
        they are Inception's ImageNet classes (Inception Score).
    """

    name: str
    dim: int
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    classes: bool


def digits_extractor(
    classifier: digits_lib.DigitsClassifier | None = None, *, seed: int = 0
) -> Extractor:
    """The digits classifier's 128-d features and class probabilities.

    Args:
      classifier: a trained classifier; None trains one with ``seed`` (seconds, deterministic).
      seed: the training seed when ``classifier`` is None.

    The extractor's name holds a hash of the classifier's parameters, so cached reference
    statistics are never reused with another classifier.
    """
    if classifier is None:
        classifier = digits_lib.train_digits_classifier(seed=seed)
    leaves = jax.tree.leaves(classifier.params)
    digest = hashlib.sha256(b"".join(np.asarray(x, np.float32).tobytes() for x in leaves))
    return Extractor(
        name=f"digits_cnn-{digest.hexdigest()[:10]}",
        dim=digits_lib.NUM_FEATURES,
        fn=lambda x: (classifier.features(x), classifier.predict_proba(x)),
        classes=True,
    )


def inception_extractor(path: str | None) -> Extractor:
    """The FID Inception network of pytorch-fid from its ``.pth`` weights (None: download).

    Grayscale images are repeated to 3 channels; probabilities are the softmax of the logits.
    """
    if path is not None and not os.path.isfile(path):
        raise ValueError(
            f"inception_path={path!r} is not a file; pass the pytorch-fid weights "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    fn = metrics.inception_from_pth(path, with_logits=True)

    def features(x):
        x = np.asarray(x)
        if x.shape[-1] == 1:
            x = np.repeat(x, 3, axis=-1)
        f, logits = fn(x)
        return np.asarray(f), np.asarray(jax.nn.softmax(np.asarray(logits, np.float64)))

    return Extractor(name="inception_pt_2015_12_05", dim=2048, fn=features, classes=False)


def split_images(config, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of one pass over ``split`` of the run's dataset, at the model's image size.

    Yields:
      ``(images uint8 [B, H, W, C], labels int32 [B])`` (labels -1 without classes).
    """
    d = config.data
    if d.name == data.DIGITS:
        x, y = data.digits_arrays(split)
        yield x, y
        return

    def make(batch: int):
        return data.make_dataset(
            d.name,
            split=split,
            global_batch_size=batch,
            seed=0,
            data_dir=d.data_dir,
            manual_dir=d.manual_dir,
            random_flip=False,
            image_size=d.image_size,
            process_index=0,
            process_count=1,
        )

    ds = make(_REFERENCE_BATCH)
    batch = min(_REFERENCE_BATCH, ds.num_examples)
    if batch != _REFERENCE_BATCH:
        ds = make(batch)
    for step in range(ds.num_examples // batch):  # one epoch (the remainder is dropped)
        b = ds.batch(step)
        yield images.to_uint8(b["image"]), b["label"]


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """Feature statistics of a data split (float64) and a subset of its features for KID."""

    mean: np.ndarray  # [D]
    cov: np.ndarray  # [D, D]
    count: int
    extractor: str
    kid_features: np.ndarray  # [M, D], M <= 5000


def reference_stats(
    extractor: Extractor,
    batches: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]],
    cache_path: str,
) -> tuple[ReferenceStats, bool]:
    """Loads the reference statistics from ``cache_path``, or computes and caches them.

    Args:
      extractor: the feature extractor.
      batches: called (only on a cache miss) for ``(images uint8, labels)`` batches.
      cache_path: the ``.npz`` file (``mu, sigma, count, extractor, kid_features``).

    Returns:
      ``(stats, from_cache)``.
    """
    if os.path.exists(cache_path):
        with np.load(cache_path) as f:
            if str(f["extractor"]) == extractor.name:
                stats = ReferenceStats(
                    f["mu"], f["sigma"], int(f["count"]), extractor.name, f["kid_features"]
                )
                return stats, True
    running = metrics.RunningStats.init(extractor.dim)
    kept = []
    for x, _ in batches():
        feats = extractor.fn(x)[0]
        running = running.update(feats)
        kept.append(np.asarray(feats, np.float32))
    kid_features = np.concatenate(kept)
    if kid_features.shape[0] > _KID_REFERENCE_ROWS:
        rows = np.random.default_rng(0).choice(kid_features.shape[0], _KID_REFERENCE_ROWS, False)
        kid_features = kid_features[np.sort(rows)]
    mean, cov = running.mean_cov()
    stats = ReferenceStats(mean, cov, running.count, extractor.name, kid_features)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
        tmp = cache_path + ".tmp.npz"
        np.savez(
            tmp,
            mu=mean,
            sigma=cov,
            count=running.count,
            extractor=extractor.name,
            kid_features=kid_features,
        )
        os.replace(tmp, cache_path)
    return stats, False


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ddpm_jax/reference_stats`` (default ``~/.cache/ddpm_jax/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax", "reference_stats")


# ----------------------------------------------------------------------------- evaluation


def _print(*args, **kwargs) -> None:
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


class _Progress:
    """Prints ``label: batch r/R | n images | x images/s`` after each sampling round."""

    def __init__(self, label: str, num: int, enabled: bool = True):
        self.label, self.num, self.enabled = label, num, enabled
        self.start = time.time()
        self.tty = sys.stdout.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        n = min(self.num, round(self.num * done / total))
        rate = n / max(time.time() - self.start, 1e-9)
        line = f"{self.label}: batch {done}/{total} | {n} images | {rate:.1f} images/s"
        end = "" if self.tty and done < total else "\n"
        _print(("\r" if self.tty else "") + line, end=end)


class Evaluator:
    """Samples from a loaded run and scores samples against the training split.

    Args:
      run: from :func:`ddpm_jax.train.load_run`.
      cache_dir: where reference statistics are cached (default :func:`default_cache_dir`).
      inception_path: FID Inception weights for non-digits datasets (None: cached download).
      extractor: overrides the dataset's default extractor (tests).
      kid_num_subsets / kid_subset_size: KID estimator settings.
      verbose: print progress.
    """

    def __init__(
        self,
        run: LoadedRun,
        *,
        cache_dir: str | None = None,
        inception_path: str | None = None,
        extractor: Extractor | None = None,
        kid_num_subsets: int = 100,
        kid_subset_size: int = 1000,
        verbose: bool = True,
    ):
        self.run, self.verbose = run, verbose
        self.kid_num_subsets, self.kid_subset_size = kid_num_subsets, kid_subset_size
        self.dataset = run.config.data.name
        self._samplers: dict[tuple, object] = {}
        if extractor is None:
            if self.dataset == data.DIGITS:
                extractor = digits_extractor()
            else:
                extractor = inception_extractor(inception_path)
        self.extractor = extractor
        h, w, _ = run.image_shape
        name = f"{self.dataset.replace('/', '_')}_{h}x{w}_train_{extractor.name}.npz"
        self.cache_path = os.path.join(cache_dir or default_cache_dir(), name)
        t0 = time.time()
        self.reference, self.reference_cached = reference_stats(
            extractor, lambda: split_images(run.config, "train"), self.cache_path
        )
        self.reference_s = time.time() - t0
        how = "loaded" if self.reference_cached else "computed and cached"
        self._log(f"reference statistics ({self.reference.count} images) {how}: {self.cache_path}")

    def _log(self, message: str) -> None:
        if self.verbose:
            _print(message)

    def score(self, imgs: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """FID, KID and class accuracy (labels >= 0, class features) or Inception Score.

        Args:
          imgs: ``[N, H, W, C]`` uint8, N >= 2.
          labels: ``[N]`` int32 requested classes (-1: none).

        Returns:
          ``{"fid", "kid_mean", "kid_std"}`` plus ``"accuracy"`` or ``"inception_score",
          "inception_score_std"``.
        """
        feats, probs = [], []
        for start in range(0, imgs.shape[0], _REFERENCE_BATCH):
            f, p = self.extractor.fn(imgs[start : start + _REFERENCE_BATCH])
            feats.append(np.asarray(f))
            probs.append(np.asarray(p))
        feats, probs = np.concatenate(feats), np.concatenate(probs)
        stats = metrics.RunningStats.init(self.extractor.dim).update(feats)
        ref = self.reference
        out = {"fid": metrics.frechet_distance(*stats.mean_cov(), ref.mean, ref.cov)}
        out["kid_mean"], out["kid_std"] = metrics.kid(
            feats,
            ref.kid_features,
            num_subsets=self.kid_num_subsets,
            subset_size=self.kid_subset_size,
        )
        if self.extractor.classes:
            if labels is not None and np.all(np.asarray(labels) >= 0):
                out["accuracy"] = float(np.mean(probs.argmax(-1) == np.asarray(labels)))
        else:
            splits = min(10, probs.shape[0])
            out["inception_score"], out["inception_score_std"] = metrics.inception_score(
                probs, splits=splits
            )
        return out

    def sample(
        self,
        *,
        method: str,
        num_steps: int,
        guidance_scale: float,
        num_samples: int,
        eta: float = 0.0,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """``(images uint8 [N, H, W, C], labels int32 [N], seconds)`` from the EMA parameters."""
        check_sampling(self.run, method, num_steps, guidance_scale, num_samples, eta)
        setting = (method, int(num_steps), float(guidance_scale), float(eta))
        if setting not in self._samplers:  # each keeps its compiled programs
            self._samplers[setting] = self.run.sampler(
                method=method, num_steps=num_steps, guidance_scale=setting[2], eta=setting[3]
            )
        sampler = self._samplers[setting]
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EVAL_TAG), 0)
        label = f"{method} {num_steps} steps, guidance {guidance_scale:g}"
        progress = _Progress(label, num_samples, self.verbose)
        t0 = time.time()
        imgs, labels = sampler(self.run.ema_params, key, num_samples, progress=progress)
        return imgs, labels, time.time() - t0

    def evaluate(
        self,
        *,
        method: str,
        num_steps: int,
        guidance_scale: float,
        num_samples: int,
        eta: float = 0.0,
        seed: int = 0,
    ) -> tuple[dict, np.ndarray]:
        """Samples and scores one setting.

        Returns:
          ``(report, images uint8 [N, H, W, C])``; the report holds the settings, ``metrics``
          (see :meth:`score`) and ``timing`` (``sample_s``, ``images_per_s``, ``metrics_s``).
        """
        imgs, labels, sample_s = self.sample(
            method=method,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            num_samples=num_samples,
            eta=eta,
            seed=seed,
        )
        t0 = time.time()
        scores = self.score(imgs, labels)
        report = {
            "workdir": self.run.workdir,
            "checkpoint_step": self.run.step,
            "dataset": self.dataset,
            "extractor": self.extractor.name,
            "method": method,
            "num_steps": int(num_steps),
            "guidance_scale": float(guidance_scale),
            "eta": float(eta),
            "seed": int(seed),
            "num_samples": int(num_samples),
            "num_devices": self.run.dp.num_devices,
            "metrics": scores,
            "timing": {
                "sample_s": sample_s,
                "images_per_s": num_samples / max(sample_s, 1e-9),
                "metrics_s": time.time() - t0,
            },
            "reference": {
                "path": self.cache_path,
                "count": self.reference.count,
                "from_cache": self.reference_cached,
            },
        }
        return report, imgs

    def floor(self) -> dict:
        """The metrics of the held-out test split (true labels) against the training split."""
        t0 = time.time()
        batches = list(split_images(self.run.config, "test"))
        imgs = np.concatenate([b[0] for b in batches])
        labels = np.concatenate([b[1] for b in batches])
        return {
            "split": "test",
            "num_images": int(imgs.shape[0]),
            "metrics": self.score(imgs, labels),
            "seconds": time.time() - t0,
        }


def check_sampling(run: LoadedRun, method, num_steps, guidance_scale, num_samples, eta) -> None:
    """Raises ValueError naming the argument when a sampling setting is not allowed."""
    T = run.config.diffusion.num_timesteps
    if method not in samplers.METHODS:
        raise ValueError(f"method={method!r} is invalid: expected one of {list(samplers.METHODS)}")
    if not isinstance(num_steps, int) or not 2 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps!r} is invalid: expected an integer in [2, {T}]")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale={guidance_scale!r} is invalid: expected a number >= 0")
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples={num_samples!r} is invalid: expected an integer >= 2")
    if not eta >= 0:
        raise ValueError(f"eta={eta!r} is invalid: expected a number >= 0")


# ----------------------------------------------------------------------------- sweeps


def parse_steps_spec(spec: str, num_timesteps: int) -> dict[str, list[int]]:
    """``"ddpm:full;ddim:10,20"`` -> ``{"ddpm": [T], "ddim": [10, 20]}`` (``full`` = T)."""
    out: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        method, _, steps = part.partition(":")
        method = method.strip()
        if method not in samplers.METHODS or not steps.strip():
            raise ValueError(
                f"sweep_steps={spec!r} is invalid: expected 'method:steps,...;...' with methods "
                f"in {list(samplers.METHODS)}"
            )
        try:
            values = [num_timesteps if s.strip() == "full" else int(s) for s in steps.split(",")]
        except ValueError:
            raise ValueError(
                f"sweep_steps={spec!r} is invalid: steps must be integers or 'full'"
            ) from None
        out[method] = values
    if not out:
        raise ValueError(f"sweep_steps={spec!r} is invalid: it names no method")
    return out


def sweep(
    evaluator: Evaluator,
    *,
    steps: dict[str, Sequence[int]],
    guidance_scales: Sequence[float],
    guidance_scale: float,
    method: str,
    num_steps: int,
    num_samples: int,
    num_samples_for: Callable[[str, int], int] | None = None,
    eta: float = 0.0,
    seed: int = 0,
    floor: bool = True,
) -> dict:
    """Metrics against the number of steps per method, and against the guidance scale.

    Args:
      evaluator: an :class:`Evaluator`.
      steps: ``{method: [num_steps, ...]}`` of the steps sweep (at ``guidance_scale``).
      guidance_scales: scales of the guidance sweep (with ``method`` / ``num_steps``).
      guidance_scale: the steps sweep's scale.
      method / num_steps: the guidance sweep's sampler.
      num_samples: samples per cell; ``num_samples_for(method, steps)`` may lower it per cell.
      eta / seed: see :meth:`Evaluator.evaluate`.
      floor: also score the held-out test split.

    Returns:
      ``{"steps": [cell, ...], "guidance": [cell, ...], "floor": {...} | None, ...}``; each cell
      has ``method, num_steps, guidance_scale, num_samples, metrics, sample_s, metrics_s``.
    """

    def cell(m: str, n: int, g: float) -> dict:
        count = num_samples if num_samples_for is None else num_samples_for(m, n)
        report, _ = evaluator.evaluate(
            method=m, num_steps=n, guidance_scale=g, num_samples=count, eta=eta, seed=seed
        )
        row = {k: report[k] for k in ("method", "num_steps", "guidance_scale", "num_samples")}
        row.update(metrics=report["metrics"], **report["timing"])
        evaluator._log(f"  -> {json.dumps(row['metrics'])}  ({row['sample_s']:.1f} s sampling)")
        return row

    steps_rows = [cell(m, n, guidance_scale) for m, ns in steps.items() for n in ns]
    guidance_rows = [cell(method, num_steps, float(g)) for g in guidance_scales]
    return {
        "workdir": evaluator.run.workdir,
        "checkpoint_step": evaluator.run.step,
        "dataset": evaluator.dataset,
        "extractor": evaluator.extractor.name,
        "num_timesteps": evaluator.run.config.diffusion.num_timesteps,
        "steps": steps_rows,
        "guidance": guidance_rows,
        "floor": evaluator.floor() if floor else None,
    }


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}"


def sweep_markdown(result: dict) -> str:
    """The sweep as two Markdown tables (steps, guidance) plus the test-split floor."""
    keys = sorted({k for r in result["steps"] + result["guidance"] for k in r["metrics"]})
    keys = [k for k in ("fid", "kid_mean", "accuracy", "inception_score") if k in keys]
    head = "| " + " | ".join(keys) + " | sample s |"
    sep = "|" + "---|" * (len(keys) + 1)

    def row(prefix: str, r: dict) -> str:
        vals = " | ".join(_fmt(r["metrics"].get(k)) for k in keys)
        return f"| {prefix} | {vals} | {r['sample_s']:.1f} |"

    lines = ["| method | steps | N " + head, "|---|---|---" + sep]
    lines += [
        row(f"{r['method']} | {r['num_steps']} | {r['num_samples']}", r) for r in result["steps"]
    ]
    if result.get("floor"):
        f = result["floor"]
        vals = " | ".join(_fmt(f["metrics"].get(k)) for k in keys)
        lines.append(f"| test split (floor) | – | {f['num_images']} | {vals} | – |")
    lines += ["", "| guidance scale | method | steps | N " + head, "|---|---|---|---" + sep]
    lines += [
        row(f"{r['guidance_scale']:g} | {r['method']} | {r['num_steps']} | {r['num_samples']}", r)
        for r in result["guidance"]
    ]
    return "\n".join(lines) + "\n"


_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    hline: tuple[str, float] | None = None,
    size: tuple[int, int] = (640, 420),
) -> Image.Image:
    """A line chart: one line (with markers) per series, axes with 5 ticks each.

    Args:
      series: ``{label: [(x, y), ...]}``.
      title / xlabel / ylabel: text.
      log_x: logarithmic x axis (x > 0).
      hline: optional ``(label, y)`` dashed horizontal reference line (e.g. the floor).
      size: ``(width, height)`` in pixels.

    Returns:
      An RGB PIL image.
    """
    w, h = size
    left, right, top, bottom = 70, 150, 30, 50
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    pts = [p for s in series.values() for p in s if np.isfinite(p[1])]
    fx = (lambda v: np.log10(v)) if log_x else (lambda v: float(v))
    xs = [fx(p[0]) for p in pts] or [0.0, 1.0]
    ys = [p[1] for p in pts] + ([hline[1]] if hline else []) or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    y0, y1 = y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0)

    def px(x, y):
        return (
            left + (fx(x) - x0) / (x1 - x0) * (w - left - right),
            h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom),
        )

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        xp = left + i / 4 * (w - left - right)
        yp = h - bottom - i / 4 * (h - top - bottom)
        draw.line([xp, h - bottom, xp, h - bottom + 4], fill="black")
        draw.text(
            (xp - 12, h - bottom + 6), f"{10**xv if log_x else xv:.3g}", fill="black", font=font
        )
        draw.line([left - 4, yp, left, yp], fill="black")
        draw.text((4, yp - 6), f"{yv:.3g}", fill="black", font=font)
    draw.text((left, 8), title, fill="black", font=font)
    draw.text(((w - right + left) // 2 - 30, h - 20), xlabel, fill="black", font=font)
    draw.text((4, top - 20), ylabel, fill="black", font=font)
    for k, (label, s) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        line = [px(x, y) for x, y in sorted(s) if np.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((w - right + 10, top + 16 * k), label, fill=color, font=font)
    if hline:
        _, yp = px(10**x0 if log_x else x0, hline[1])
        for xs_ in range(left, w - right, 10):
            draw.line([xs_, yp, min(xs_ + 5, w - right), yp], fill="gray")
        draw.text((w - right + 10, top + 16 * len(series)), hline[0], fill="gray", font=font)
    return img


def save_charts(path: str, charts: Sequence[Image.Image]) -> str:
    """Writes charts side by side as one PNG."""
    width = sum(c.width for c in charts)
    out = Image.new("RGB", (width, max(c.height for c in charts)), "white")
    x = 0
    for c in charts:
        out.paste(c, (x, 0))
        x += c.width
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)
    return path


def write_sweep(result: dict, out_dir: str) -> dict[str, str]:
    """Writes ``sweep.json``, ``sweep.md``, ``sweep_steps.png`` and ``sweep_guidance.png``.

    Returns:
      ``{"json", "markdown", "steps_plot", "guidance_plot"}`` paths.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (
            ("json", "sweep.json"),
            ("markdown", "sweep.md"),
            ("steps_plot", "sweep_steps.png"),
            ("guidance_plot", "sweep_guidance.png"),
        )
    }
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths["markdown"], "w") as f:
        f.write(sweep_markdown(result))
    fid = "digits-FID" if result["dataset"] == data.DIGITS else "FID"
    by_method: dict[str, list] = {}
    for r in result["steps"]:
        by_method.setdefault(r["method"], []).append((r["num_steps"], r["metrics"]["fid"]))
    floor = result.get("floor")
    hline = ("test split", floor["metrics"]["fid"]) if floor else None
    chart = line_chart(
        by_method,
        title=f"{fid} vs sampling steps",
        xlabel="steps (log)",
        ylabel=fid,
        log_x=True,
        hline=hline,
    )
    save_charts(paths["steps_plot"], [chart])
    g = result["guidance"]
    label = f"{g[0]['method']} {g[0]['num_steps']} steps" if g else ""
    charts = [
        line_chart(
            {label: [(r["guidance_scale"], r["metrics"]["fid"]) for r in g]},
            title=f"{fid} vs guidance scale",
            xlabel="guidance scale",
            ylabel=fid,
            hline=hline,
        )
    ]
    for key in ("accuracy", "inception_score"):
        if g and key in g[0]["metrics"]:
            charts.append(
                line_chart(
                    {label: [(r["guidance_scale"], r["metrics"][key]) for r in g]},
                    title=f"{key} vs guidance scale",
                    xlabel="guidance scale",
                    ylabel=key,
                    hline=("test split", floor["metrics"][key]) if floor else None,
                )
            )
    save_charts(paths["guidance_plot"], charts)
    return paths


def write_report(report: dict, imgs: np.ndarray, out: str) -> tuple[str, str]:
    """Writes the JSON report at ``out`` and a PNG grid (up to 100 images) next to it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    grid = os.path.splitext(out)[0] + ".png"
    n = min(imgs.shape[0], 100)
    ncols = min(10, n)
    images.save_png_grid(grid, imgs[: (n // ncols) * ncols], ncols)
    report = dict(report, grid=grid)
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(out + ".tmp", out)
    return out, grid


__all__ = [
    "Evaluator",
    "Extractor",
    "ReferenceStats",
    "check_sampling",
    "default_cache_dir",
    "digits_extractor",
    "inception_extractor",
    "line_chart",
    "save_charts",
    "parse_steps_spec",
    "reference_stats",
    "split_images",
    "sweep",
    "sweep_markdown",
    "write_report",
    "write_sweep",
]
