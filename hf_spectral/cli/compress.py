"""``hf-spectral compress``: a pretrained model in replace mode, each layer projected onto its kept
coefficients. Reports each layer's error against its dense weight (from the coefficient space, by
Parseval), the parameters and the bytes before and after (in memory, with and without the evaluation
weight cache, and on disk), and with ``--text`` the perplexity before and after. A result that would take
more disk than the dense weights it loaded (dequantized, at ``--dtype``) is refused before anything is
written, unless ``--allow-growth``; more memory is said before writing."""

from __future__ import annotations

import json
import math
import os
import sys

from .common import CLIError, count, fraction, load_model, positive_int, size_in_bytes, table

LAYOUTS = ("lowfreq", "grid", "sparse_grid", "triangle", "random", "energy", "banded")  # hf_spectral.layouts.LAYOUTS (tested equal)
WEIGHTS_FILE = "adapter_model.safetensors"  # hf_spectral.ecosystem.adapter_files.WEIGHTS_NAME (tested equal)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "compress", help="replace-mode compression of a pretrained model (projection onto kept coefficients)",
        description=(
            "Compress a pretrained model: every targeted linear layer keeps FRACTION of its DCT coefficients "
            "(the L2-best approximation on the chosen index set), and the dense weight is dropped. Prints each "
            "layer's relative reconstruction error, the parameters and bytes before and after (and with --text the "
            "perplexity before and after), and saves a replace-mode adapter that holds the whole compressed model. "
            "A result larger on disk than the dense model is refused unless --allow-growth."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub repo id")
    parser.add_argument("--fraction", type=fraction, required=True, help="share of each layer's coefficients kept, in (0, 1]")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the compressed adapter")
    parser.add_argument("--layout", default="energy", choices=LAYOUTS,
                        help="which coefficients are kept (default: energy, the L2-best set for each layer)")
    parser.add_argument("--basis", default="dct", choices=("dct", "random_orthonormal"), help="default: dct")
    parser.add_argument("--target-modules", metavar="A,B", help="comma-separated module names (default: all linear layers but the head)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random and banded layouts")
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype to load the model in (default float32)")
    parser.add_argument("--revision", help="Hub revision of MODEL")
    parser.add_argument("--text", metavar="FILE",
                        help="a text file: print the perplexity before and after on fixed windows of its tokens "
                             "(needs the model's tokenizer in its folder)")
    parser.add_argument("--eval-windows", type=positive_int, default=4, metavar="N",
                        help="with --text: how many windows, evenly spaced over the text (default 4)")
    parser.add_argument("--eval-length", type=positive_int, default=256, metavar="T",
                        help="with --text: tokens per window (default 256)")
    parser.add_argument("--allow-growth", action="store_true",
                        help="write the result even where it takes more disk than the dense model")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------
# what the dense model holds


def _dense_linear_weights(model) -> dict:
    """{module name: its weight as out x in} of every Linear and Conv1D. The tensors are the model's own (no
    copy): replace mode drops the layers' references, and these keep the weights alive until the errors are
    measured."""
    from peft.utils.other import transpose
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return {
        name: transpose(module.weight.detach(), isinstance(module, Conv1D))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight is not None
    }


def resident_bytes(model) -> int:
    """Bytes of every parameter and buffer of ``model`` in memory, each storage counted once (tied weights)."""
    storages = {}
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def parameter_bytes(model) -> int:
    """Bytes of the model's parameters as loaded (dequantized, at the loaded dtype), each storage counted once: what
    the dense weights take written as safetensors, whatever the input's own format (a 4-bit .gguf, a bf16 folder)."""
    storages = {}
    for tensor in model.parameters():
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def stored_weight_files(name: str, revision) -> dict[str, int]:
    """{file: bytes} of the weight files a model is stored in (its safetensors, else its PyTorch pickles, or the
    .gguf file itself); empty when they cannot be found (a Hub model not in the local cache as a snapshot)."""
    if os.path.isfile(name):
        return {os.path.basename(name): os.path.getsize(name)}
    folder = name
    if not os.path.isdir(folder):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name, revision=revision, local_files_only=True)
        except Exception:
            return {}
    files = sorted(os.listdir(folder))
    chosen = [f for f in files if f.endswith(".safetensors") and not f.startswith("adapter_model")]
    chosen = chosen or [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    return {f: os.path.getsize(os.path.join(folder, f)) for f in chosen}


# --------------------------------------------------------------------------------------------------
# the error of a layer, and what it takes


def relative_error(space, dense) -> float:
    """``||W - W_K||_F / ||W||_F`` by Parseval: ``||W - W_K||^2 = ||W||^2 - ||S_Omega||^2``, where S_Omega are the
    kept coefficients of the dense weight W. Both energies in float64 (the kept coefficients are the analysis of
    W in float64, so at fraction 1 the difference is ~1e-16 and not float32's ~1e-7); no weight is rebuilt."""
    import torch

    weight = dense.to(torch.float64)
    total = float(weight.square().sum())
    if total == 0.0:
        return 0.0
    kept = float(space.from_matrix(weight).square().sum())
    return math.sqrt(max(total - kept, 0.0) / total)


def layer_storage(layer, adapter: str = "default") -> dict:
    """What one spectral layer holds: its index set's form on disk and the bytes in memory and on disk."""
    from ..transforms.index_codec import encoded_bytes, encoding_of

    m, n = layer.out_features, layer.in_features
    values = layer.spectral_coefficients[adapter]
    k = values.numel()
    coefficient_bytes = k * values.element_size()
    if adapter in layer.spectral_indices:  # data-dependent: saved with the adapter
        held = layer.spectral_indices[adapter]
        encoding = encoding_of(k, m, n)
        form = "a bitmap" if encoding == "bitmap" else f"{str(held.dtype).removeprefix('torch.')} positions"
        return {"index_set": f"saved as {form}",
                "bytes_in_memory": coefficient_bytes + held.numel() * held.element_size(),
                "bytes_on_disk": coefficient_bytes + encoded_bytes(k, m, n)}
    if adapter in layer.spectral_fixed_indices:  # recomputed from shape and seed at load
        held = layer.spectral_fixed_indices[adapter]
        return {"index_set": "recomputed from the seed",
                "bytes_in_memory": coefficient_bytes + held.numel() * held.element_size(),
                "bytes_on_disk": coefficient_bytes}
    return {"index_set": "none, a block", "bytes_in_memory": coefficient_bytes, "bytes_on_disk": coefficient_bytes}


def weight_cache_bytes(peft_model) -> int:
    """What the evaluation-time weight cache adds: one dense out x in weight per layer, in the model's dtype."""
    from ..tuner.model import spectral_layers

    return sum(layer.out_features * layer.in_features * layer.model_dtype().itemsize
               for _, layer in spectral_layers(peft_model))


_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16", "int64": "I64",
                       "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def predicted_weights_file(peft_model) -> int:
    """Bytes of the adapter_model.safetensors that ``save_pretrained`` writes: the data of the tensors it saves
    (index sets in their encoded form) and the header that names them."""
    from peft import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(peft_model)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype).removeprefix("torch."), "F32")
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length % 8) + offset


# --------------------------------------------------------------------------------------------------
# perplexity on a text


def load_tokenizer(name: str, revision):
    from transformers import AutoTokenizer

    kwargs = {"revision": revision}
    if os.path.isfile(name):  # a .gguf file: its tokenizer is inside it
        name, kwargs["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        # transformers makes an empty tokenizer from config.json alone where the folder holds none
        problem = None if getattr(tokenizer, "vocab_size", 0) else "its vocabulary is empty"
    except (OSError, ValueError, TypeError, KeyError) as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if problem is not None:
        raise CLIError(
            f"--text needs the model's tokenizer, and {name!r} has none that loads ({problem}). Save it beside the "
            "model (tokenizer.save_pretrained(folder)), or leave out --text."
        ) from None
    return tokenizer


def token_windows(tokenizer, path: str, windows: int, length: int, model):
    """``windows`` rows of ``length`` tokens, evenly spaced over the text from its start to its end: the same
    windows for the model before and after."""
    import torch

    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and length > limit:
        raise CLIError(f"--eval-length {length} is longer than the model's {limit} positions; give at most {limit}.")
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"--text {path!r} cannot be read as UTF-8 text ({error}).") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max(length, 2):
        raise CLIError(
            f"--text {path!r} has {len(ids)} tokens; --eval-length {length} needs at least {max(length, 2)}. Give a "
            "longer text or a smaller --eval-length."
        )
    span = len(ids) - length
    starts = sorted({round(i * span / max(windows - 1, 1)) for i in range(windows)})
    return torch.tensor([ids[s:s + length] for s in starts], dtype=torch.long)


def perplexity(model, rows) -> float:
    """exp of the mean next-token loss over the rows, one row at a time."""
    import torch

    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for row in rows:
            ids = row[None].to(device)
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses))


def _check_causal_lm(model, name: str) -> None:
    if getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise CLIError(
            f"--text measures a language model's perplexity, and {name!r} loaded as {type(model).__name__}, which "
            "has no language-model head. Leave out --text."
        )


# --------------------------------------------------------------------------------------------------
# the command


def run(args) -> int:
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists and is not empty; pick a new folder or add --overwrite.")
    if args.text is not None and not os.path.isfile(args.text):
        raise CLIError(f"--text {args.text!r}: no such file. Give a text file, or leave out --text.")
    from peft import get_peft_model

    from .._peft_registry import PEFT_KEY_PREFIX
    from ..io.model_card import write_model_card
    from ..tuner.config import SpectralConfig
    from ..tuner.model import spectral_layers

    targets = args.target_modules.split(",") if args.target_modules else None
    try:
        config = SpectralConfig(
            mode="replace", coefficient_fraction=args.fraction, layout=args.layout, basis=args.basis,
            seed=args.seed, init_weights="project", target_modules=targets,
        )
    except ValueError as error:
        raise CLIError(str(error)) from None

    print(f"loading {args.model} ...", file=sys.stderr)
    model = load_model(args.model, args.revision, args.dtype).eval()
    rows = None
    if args.text is not None:
        _check_causal_lm(model, args.model)
        rows = token_windows(load_tokenizer(args.model, args.revision), args.text, args.eval_windows,
                             args.eval_length, model)
    before = sum(p.numel() for p in model.parameters())
    dense_memory = resident_bytes(model)
    dense_weights = parameter_bytes(model)
    dense_files = stored_weight_files(args.model, args.revision)
    perplexity_before = None if rows is None else perplexity(model, rows)
    weights = _dense_linear_weights(model)

    print("projecting layers ...", file=sys.stderr)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:  # no target found, a budget that does not fit, ...
        raise CLIError(str(error).splitlines()[0]) from None

    records = []
    for name, layer in spectral_layers(peft_model):
        key = name.removeprefix(PEFT_KEY_PREFIX)
        dense = weights.pop(key)
        records.append({
            "name": key, "shape": [layer.out_features, layer.in_features],
            "n_coefficients": layer.spectral_coefficients["default"].numel(),
            "relative_error": relative_error(layer.coefficient_space("default"), dense),
            "dense_bytes": dense.numel() * dense.element_size(), **layer_storage(layer),
        })
    del weights  # the dense weights go now
    after = sum(p.numel() for p in peft_model.parameters())
    memory = {"without_cache": resident_bytes(peft_model), "cache": weight_cache_bytes(peft_model)}
    perplexity_after = None
    if rows is not None:
        perplexity_after = perplexity(peft_model.eval(), rows)
        for _, layer in spectral_layers(peft_model):
            layer.drop_weight_cache()
    predicted = predicted_weights_file(peft_model)

    _print_report(args, records, before, after)
    dense_disk = sum(dense_files.values()) if dense_files else None
    _print_bytes(records, dense_memory, dense_weights, dense_disk, dense_files, memory, predicted, args.dtype)
    if rows is not None:
        print(f"perplexity on {args.text} ({len(rows)} windows of {args.eval_length} tokens): "
              f"{perplexity_before:.3f} before, {perplexity_after:.3f} after")
    _check_growth(args, dense_memory, dense_weights, memory["without_cache"], predicted)

    os.makedirs(args.out, exist_ok=True)
    peft_model.save_pretrained(args.out)
    write_model_card(args.out, base_model=args.model)
    written = {f: os.path.getsize(os.path.join(args.out, f)) for f in (WEIGHTS_FILE, "adapter_config.json", "README.md")
               if os.path.isfile(os.path.join(args.out, f))}
    report = {
        "model": args.model, "fraction": args.fraction, "layout": args.layout, "basis": args.basis,
        "seed": args.seed, "parameters_before": before, "parameters_after": after,
        "compressed_layer_parameters_before": sum(r["shape"][0] * r["shape"][1] for r in records),
        "compressed_layer_parameters_after": sum(r["n_coefficients"] for r in records),
        "bytes_before": {
            "compressed_layers": sum(r["dense_bytes"] for r in records), "model_in_memory": dense_memory,
            "dense_weights": dense_weights, "model_on_disk": dense_disk, "model_files": dense_files,
        },
        "bytes_after": {
            "compressed_layers_in_memory": sum(r["bytes_in_memory"] for r in records),
            "compressed_layers_on_disk": sum(r["bytes_on_disk"] for r in records),
            "model_in_memory": memory["without_cache"], "weight_cache": memory["cache"],
            "model_in_memory_with_cache": memory["without_cache"] + memory["cache"],
            "model_on_disk": written.get(WEIGHTS_FILE), "predicted_weights_file": predicted, "written_files": written,
        },
        "layers": records,
    }
    if rows is not None:
        report["perplexity"] = {"text": args.text, "windows": len(rows), "length": args.eval_length,
                                "before": perplexity_before, "after": perplexity_after}
    with open(os.path.join(args.out, "compression.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print("written: " + ", ".join(f"{f} {size_in_bytes(s)}" for f, s in written.items()) + " (and compression.json)")
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"saved to {args.out} ({size_in_bytes(size)}); load it with: import hf_spectral; "
          f"PeftModel.from_pretrained(<the base model>, {args.out!r})")
    return 0


def _print_report(args, records, before: int, after: int) -> None:
    rows = [
        [r["name"], f"{r['shape'][0]} x {r['shape'][1]}", str(r["n_coefficients"]), f"{r['relative_error']:.4f}",
         r["index_set"]]
        for r in records
    ]
    print(table(rows, ["layer", "shape (out x in)", "K", "rel. error ||W - W_K|| / ||W||", "index set"]))
    total_error = math.sqrt(sum(r["relative_error"] ** 2 for r in records) / max(len(records), 1))
    dense_targets = sum(r["shape"][0] * r["shape"][1] for r in records)
    kept = sum(r["n_coefficients"] for r in records)
    print()
    print(f"compressed layers: {len(records)} (layout {args.layout}, basis {args.basis}, fraction {args.fraction})")
    print(f"mean relative error (root mean square over layers, by Parseval in float64): {total_error:.4f}")
    print(
        f"those layers: {count(dense_targets)} -> {count(kept)} parameters "
        f"(saving {count(dense_targets - kept)}, {1 - kept / dense_targets:.1%})"
    )
    print(
        f"whole model:  {count(before)} -> {count(after)} parameters "
        f"(saving {count(before - after)}, {1 - after / before:.1%})"
    )


def _change(before, after) -> str:
    if not before or after is None:
        return ""
    return f"{after / before - 1:+.1%}"


def _print_bytes(records, dense_memory, dense_weights, dense_disk, dense_files, memory, predicted, dtype) -> None:
    dense_layers = sum(r["dense_bytes"] for r in records)
    in_memory = sum(r["bytes_in_memory"] for r in records)
    on_disk = sum(r["bytes_on_disk"] for r in records)
    with_cache = memory["without_cache"] + memory["cache"]
    disk_label = ", ".join(dense_files) if dense_files else "not found"
    rows = [
        ["those layers, in memory", size_in_bytes(dense_layers), size_in_bytes(in_memory),
         _change(dense_layers, in_memory)],
        ["those layers, on disk (tensor data)", size_in_bytes(dense_layers), size_in_bytes(on_disk),
         _change(dense_layers, on_disk)],
        ["whole model, in memory", size_in_bytes(dense_memory), size_in_bytes(memory["without_cache"]),
         _change(dense_memory, memory["without_cache"])],
        ["  with the evaluation weight cache", "", size_in_bytes(with_cache), _change(dense_memory, with_cache)],
        [f"whole model, dense weights as loaded ({dtype}) -> {WEIGHTS_FILE}", size_in_bytes(dense_weights),
         size_in_bytes(predicted), _change(dense_weights, predicted)],
        [f"whole model, on disk ({disk_label} -> {WEIGHTS_FILE})",
         "?" if dense_disk is None else size_in_bytes(dense_disk), size_in_bytes(predicted),
         _change(dense_disk, predicted)],
    ]
    print()
    print(table(rows, ["bytes", "dense", "compressed", "change"]))
    kinds = {}
    for r in records:
        kinds[r["index_set"]] = kinds.get(r["index_set"], 0) + 1
    saved = any(kind.startswith("saved") for kind in kinds)
    print("index sets: " + ", ".join(f"{kind} ({n} layers)" for kind, n in sorted(kinds.items())) +
          (" (saved: a bitmap of m x n bits or int32 positions, whichever is smaller)" if saved else ""))
    print(f"the weight cache holds one dense weight per layer in evaluation ({size_in_bytes(memory['cache'])}); "
          "hf_spectral.set_weight_cache(model, False) turns it off (each forward then rebuilds the weights)")


def _check_growth(args, dense_memory: int, dense_weights: int, memory: int, predicted: int) -> None:
    """Say so, before anything is written, where the result is larger than the dense model: in memory a note; on
    disk a refusal, unless --allow-growth. The dense size on disk is that of the weights as loaded (dequantized, at
    --dtype), not of the input's files: a 4-bit .gguf is smaller than the dense model it holds."""
    block = args.layout == "lowfreq"
    if memory > dense_memory:
        advice = "" if block else "; --layout lowfreq holds no positions"
        print(
            f"note: in memory the compressed model takes {size_in_bytes(memory)} against the dense model's "
            f"{size_in_bytes(dense_memory)} ({_change(dense_memory, memory)}): a scattered layout holds each kept "
            "coefficient (float32) with its int32 position, 8 bytes against 4 for a dense fp32 entry, so above "
            f"fraction 0.5 it holds more than the dense weight{advice}.",
            file=sys.stderr,
        )
    if predicted <= dense_weights:
        return
    what = (f"{size_in_bytes(predicted)} on disk against the dense model's {size_in_bytes(dense_weights)} "
            f"({_change(dense_weights, predicted)}; its weights as loaded, {args.dtype})")
    if args.allow_growth:
        print(f"warning: the compressed model is larger than the dense one ({what}); writing it (--allow-growth)",
              file=sys.stderr)
        return
    if args.layout in ("lowfreq", "grid", "triangle"):
        why, fix = "", "Lower --fraction"
    else:
        why = " plus its index set"
        fix = "Lower --fraction, use --layout lowfreq or triangle (no index set is saved)"
    raise CLIError(
        f"the compressed model would be larger than the dense one: {what}. At fraction {args.fraction} each layer "
        f"keeps that share of its coefficients (float32 even in a bf16 or fp16 model){why}. Nothing was written. "
        f"{fix}, or pass --allow-growth to write it anyway."
    )
