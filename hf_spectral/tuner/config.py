"""SpectralConfig: what can be set for a spectral adapter, and checks that the values make sense."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .._peft_registry import SPECTRAL_PEFT_TYPE
from ..transforms.bases import BASES
from ..transforms.layouts import ALL_LAYOUTS, CALIBRATED_LAYOUTS, check_budget, resolve_budget

MODES = ("delta", "replace")
# the layout a config without one gets: in delta mode the one that adapted best at LoRA's step cost, in replace mode
# one that can hold a full-rank weight
DEFAULT_LAYOUTS = {"delta": "sparse_grid", "replace": "random"}
INIT_CHOICES = (True, False, "project", "random")

# Budgets used when neither n_coefficients nor coefficient_fraction is given.
DEFAULT_DELTA_COEFFICIENTS = 1000
DEFAULT_REPLACE_FRACTION = 0.5


@dataclass
class SpectralConfig(PeftConfig):
    """Configuration of a spectral (DCT-coefficient) adapter.

    A targeted layer's weight W (out x in) is written as ``W = C_m^T S C_n`` with C the orthonormal
    DCT; only K entries of S (the "index set", chosen by ``layout``) are stored and trained.

    Args:
        mode (`str`): ``"delta"`` (default): ``y = W0 x + scaling * IDCT2(S) x`` with the pretrained W0
            frozen, for fine-tuning (a peer of LoRA and FourierFT). ``"replace"``: ``y = IDCT2(S) x``, the
            dense weight is released and the layer lives in coefficient space, for training from scratch or
            compressing a pretrained model. In replace mode every parameter that is not spectral
            (embeddings, norms, biases, head) is trained and saved too (see ``train_non_spectral``).
        n_coefficients (`int`): K per layer. Rule of thumb for delta mode: K = 1000 on a 768 x 768 layer is
            about LoRA r = 8's quality at 1/12 of its parameters. Give this or ``coefficient_fraction``.
        coefficient_fraction (`float`): K as a fraction of each layer's m * n, in (0, 1]. Replace mode at 0.5
            matches dense training in the paper at half the parameters. When neither budget is given,
            delta mode takes n_coefficients = 1000 and replace mode coefficient_fraction = 0.5.
        budget_pattern (`dict`): per-module budgets by name pattern, like LoRA's ``rank_pattern``:
            ``{"c_fc": 4000, r"h\\.0\\..*": 0.25}``; an int is a count, a float a fraction.
        layout (`str`, optional): which coefficients are kept: ``"sparse_grid"`` (delta mode's default: K
            random cells of ``grid_rank`` random frequency rows x as many columns; spread over the spectrum,
            rank <= grid_rank, run as LoRA at that rank), ``"random"`` (replace mode's default, seeded; can
            represent full-rank matrices), ``"lowfreq"`` (top-left block; rank <= block size, fastest forward),
            ``"grid"`` (every coefficient of p random frequency rows x q random columns: spread over the
            spectrum, and run as a rank <= min(p, q) product with fixed basis rows, at lowfreq's cost),
            ``"triangle"`` (lowest frequencies in zigzag order), ``"energy"`` (largest |DCT| of the existing
            weight), ``"banded"`` (rings by frequency, half by energy and half at random per ring),
            ``"gradient"`` (delta mode: largest |DCT| of the loss gradient on calibration batches; chosen by
            ``hf_spectral.init_gradient_layout(model, batches)`` after ``get_peft_model``, before training).
        basis (`str`): ``"dct"`` (default) or ``"random_orthonormal"`` (a seeded random orthonormal basis:
            the control of the paper's ablation).
        scaling (`float`): delta mode's multiplier of the update. Under Adam, scaling and learning rate
            trade off one for one; with the default 10 the learning rates that suit LoRA (1e-4 to 1e-3)
            suit spectral deltas too. Ignored in replace mode, where S is the weight itself.
        seed (`int`): seed of the random and grid layouts, the ``banded`` layout's random share and the
            random basis. The same seed gives the same indices on every machine and library version.
        banded_rings (`int`), banded_energy_share (`float`): the ``banded`` layout's number of rings and the
            share of each ring chosen by energy (the rest is random).
        grid_rank (`int`, optional): the ``sparse_grid`` layout's r: its K coefficients sit at random among the
            cells of r random frequency rows x r random columns, so the update has rank <= r and a step costs about
            what LoRA at rank r costs. Each layer's budget must fit in its r x r cells. None (default): about
            2 sqrt(K) per layer, 4K cells (64 for K = 1000).
        init_weights (`bool` or `str`): ``True`` (default) starts from what the base model is: in delta mode
            S = 0 (the identity); in replace mode ``"project"`` for a weight that transformers loaded from a
            checkpoint (``from_pretrained``) and ``"random"`` for one built by ``from_config`` or plain torch
            (a fresh model has no function to preserve, and projecting its random init would shrink it by
            sqrt(K / mn)). ``False``: small
            random coefficients (for tests that must see a non-zero update). ``"project"`` (replace mode):
            keep the DCT of the existing weight on the index set, the best approximation of W with K
            coefficients. ``"random"`` (replace mode): draw S so that the rebuilt weight has the variance of
            the existing (freshly initialised) weight.
        spectral_dropout (`float`): delta mode: dropout on the input of the update, as LoRA's ``lora_dropout``:
            ``y = W0 x + scaling * dW dropout(x)`` while training; evaluation and merged layers are unaffected.
            In [0, 1); 0 (default) keeps the single fused matmul. Embedding layers take none (their input is
            token ids), as in LoRA.
        train_non_spectral (`bool`): replace mode only. True (default): every parameter that is not spectral
            stays trainable and is saved with the adapter, so a model trained from scratch is restored from
            its adapter alone. False: they are frozen and not saved (compress-then-fine-tune with a frozen
            body).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, fan_in_fan_out, bias,
        modules_to_save, trainable_token_indices: as in PEFT's other methods. Without ``target_modules``,
            delta mode targets LoRA's default modules of known architectures and replace mode all linear
            layers but the output head.
        target_parameters (`list[str]`): parameters to adapt by name, PEFT's meaning: the 3-D expert weights of
            transformers' MoE models, e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``. Each expert
            gets its own delta of K coefficients (the budget, per expert) on one shared index set. Delta mode and
            the random, lowfreq and triangle layouts. To adapt only these, set ``target_modules=[]``.
        layer_shapes (`dict`): filled in when the adapter is saved: the (out, in) shape of every spectral layer,
            so that loading into a model whose shapes differ fails before the model is touched.
        fingerprints (`dict`): filled in when the adapter is saved: the fields that decide each layer, and per
            layer a hash of its index set and a checksum of its saved tensors, so that an edited config or a
            weights file from another adapter is refused on load (see ``hf_spectral.loading``).
    """

    mode: str = field(default="delta", metadata={"help": "'delta' (fine-tuning) or 'replace' (the weight is S)."})
    n_coefficients: Optional[int] = field(default=None, metadata={"help": "K per layer."})
    coefficient_fraction: Optional[float] = field(default=None, metadata={"help": "K as a fraction of m * n."})
    budget_pattern: Optional[dict] = field(default_factory=dict, metadata={"help": "Per-module budgets by pattern."})
    layout: Optional[str] = field(
        default=None, metadata={"help": f"Index set, one of {ALL_LAYOUTS}; None: {DEFAULT_LAYOUTS} by mode."}
    )
    basis: str = field(default="dct", metadata={"help": f"One of {BASES}."})
    scaling: float = field(default=10.0, metadata={"help": "Delta mode: multiplier of the update."})
    seed: int = field(default=0, metadata={"help": "Seed of random layouts and bases."})
    banded_rings: int = field(default=4, metadata={"help": "Rings of the 'banded' layout."})
    banded_energy_share: float = field(default=0.5, metadata={"help": "Share of each ring chosen by energy."})
    grid_rank: Optional[int] = field(
        default=None,
        metadata={"help": "The 'sparse_grid' layout's frequency rows and columns (the update's rank bound); None: about 2 sqrt(K)."},
    )
    spectral_dropout: float = field(default=0.0, metadata={"help": "Delta mode: dropout on the update's input."})
    init_weights: Union[bool, str] = field(default=True, metadata={"help": f"One of {INIT_CHOICES}."})
    train_non_spectral: bool = field(
        default=True, metadata={"help": "Replace mode: train and save every non-spectral parameter."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex; 'all-linear' for every linear layer."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave alone."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Layers storing (in, out), like Conv1D; each layer detects its own, so this is informational."},
    )
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'spectral_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Other modules to train and save (adapter-scoped copies)."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token ids whose embeddings are trained (as in LoRA)."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Parameters to adapt by name (MoE experts), e.g. 'experts.gate_up_proj'."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    layer_shapes: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Filled in on save: (out, in) of every spectral layer."}
    )
    fingerprints: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Filled in on save: hashes of each layer's index set and weights."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = SPECTRAL_PEFT_TYPE
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        self.budget_pattern = dict(self.budget_pattern or {})
        self.layer_shapes = dict(self.layer_shapes or {})
        self.fingerprints = dict(self.fingerprints or {})
        self._check_choice("mode", self.mode, MODES)
        if self.layout is None:
            self.layout = DEFAULT_LAYOUTS[self.mode]
        self._check_choice("layout", self.layout, ALL_LAYOUTS)
        if self.layout in CALIBRATED_LAYOUTS and self.mode != "delta":
            raise ValueError(
                f"layout={self.layout!r} chooses where a delta's first steps move the most; mode={self.mode!r} is not "
                "supported with it. Use mode='delta', or layout='energy' to rank the weight itself in replace mode."
            )
        self._check_choice("basis", self.basis, BASES)
        self._check_choice("bias", self.bias, ("none", "all", "spectral_only"))
        if self.init_weights not in INIT_CHOICES or (
            isinstance(self.init_weights, str) and self.init_weights not in ("project", "random")
        ):
            raise ValueError(f"init_weights={self.init_weights!r} is not one of {INIT_CHOICES}.")
        if self.mode == "delta" and isinstance(self.init_weights, str):
            raise ValueError(
                f"init_weights={self.init_weights!r} is a replace-mode init; delta mode takes True (start as the "
                "identity) or False (small random coefficients). Use mode='replace' to project or re-draw weights."
            )
        # The budget's form is checked now; its range against each layer's m * n when the layer is built.
        if self.n_coefficients is not None or self.coefficient_fraction is not None:
            check_budget(self.n_coefficients, self.coefficient_fraction)
        for pattern, budget in self.budget_pattern.items():
            where = f" in budget_pattern[{pattern!r}]"
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise ValueError(f"{budget!r}{where} must be an int (a count) or a float (a fraction).")
            if isinstance(budget, int):
                check_budget(budget, None, where)
            else:
                check_budget(None, budget, where)
        if not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling)):
            raise ValueError(f"scaling={self.scaling!r} must be a finite number, e.g. 10.0.")
        if isinstance(self.spectral_dropout, bool) or not isinstance(self.spectral_dropout, (int, float)) or not (
            0.0 <= self.spectral_dropout < 1.0
        ):
            raise ValueError(f"spectral_dropout={self.spectral_dropout!r} is outside [0, 1), e.g. 0.05 (0 turns it off).")
        if self.spectral_dropout and self.mode == "replace":
            raise ValueError(
                f"spectral_dropout={self.spectral_dropout!r} needs mode='delta': it drops the input of the update, and a "
                "replace-mode layer is all update (use the model's own dropout there)."
            )
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters):
                raise ValueError(
                    f"target_parameters={self.target_parameters!r} must be a list of parameter names, e.g. "
                    "['experts.gate_up_proj', 'experts.down_proj']."
                )
            self.target_parameters = list(self.target_parameters)
            if self.target_parameters and self.mode == "replace":
                raise ValueError("target_parameters needs mode='delta': replace mode adapts linear layers only.")
        if not isinstance(self.banded_rings, int) or self.banded_rings < 1:
            raise ValueError(f"banded_rings={self.banded_rings!r} must be a positive integer, e.g. 4.")
        if not 0.0 <= self.banded_energy_share <= 1.0:
            raise ValueError(f"banded_energy_share={self.banded_energy_share!r} is outside [0, 1], e.g. 0.5.")
        if self.grid_rank is not None and (
            isinstance(self.grid_rank, bool) or not isinstance(self.grid_rank, int) or self.grid_rank < 1
        ):
            raise ValueError(
                f"grid_rank={self.grid_rank!r} must be a positive integer (the sparse_grid layout's frequency rows and "
                "columns), e.g. 64, whose r x r cells hold each layer's budget; or None for about 2 sqrt(K)."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    @staticmethod
    def _check_choice(name: str, value, allowed: tuple) -> None:
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}.")

    def layout_options(self) -> dict:
        """The layout settings every ``make_space`` call of this config passes on."""
        return {"rings": self.banded_rings, "energy_share": self.banded_energy_share, "grid_rank": self.grid_rank}

    def budget_for(self, module_key: str, m: int, n: int) -> int:
        """K for an m x n module, after budget_pattern and the defaults."""
        from peft.utils.other import get_pattern_key

        pattern = get_pattern_key(list(self.budget_pattern), module_key)
        if pattern in self.budget_pattern:
            budget = self.budget_pattern[pattern]
            count, fraction = (budget, None) if isinstance(budget, int) else (None, float(budget))
        elif self.n_coefficients is not None or self.coefficient_fraction is not None:
            count, fraction = self.n_coefficients, self.coefficient_fraction
        elif self.mode == "delta":
            # the default must suit any model, so a layer smaller than it keeps all its coefficients
            count, fraction = min(DEFAULT_DELTA_COEFFICIENTS, m * n), None
        else:
            count, fraction = None, DEFAULT_REPLACE_FRACTION
        return resolve_budget(m, n, count, fraction, name=module_key)
