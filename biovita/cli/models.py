"""`biovita list-models | predict | embed | export`: use a model.

Each command imports what it needs when it runs (torch, Ray): `biovita --help` stays instant.
"""

from __future__ import annotations

CHECKPOINT_HELP = ("a biovita checkpoint folder, the released layout (a folder, or "
                   "hf-hub:risashinoda/BioVITA) or an authors' training checkpoint (.pth)")
CLAP_HELP = ("CLAP base of the released layouts: a Hub id or a local transformers folder "
             "(architecture and preprocessor_config.json; default laion/clap-htsat-unfused)")


def _add_checkpoint(s) -> None:
    s.add_argument("checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--clap", default=None, metavar="NAME_OR_DIR", help=CLAP_HELP)


def _list_models(a) -> int:
    from biovita.models.registry import MODEL_CONFIGS, list_models

    for name in list_models(a.pattern):
        spec = MODEL_CONFIGS[name]
        print(f"{name:<24} {spec.description}")
        print(f"{'':<24}   image+text: {spec.clip_model}  audio: {spec.audio_model}")
    return 0


def _predict(a) -> int:
    from biovita.predict import Predictor

    p = Predictor(a.checkpoint, taxa_csv=a.taxa, clap=a.clap)
    rows = p.predict(a.files, rank=a.rank, k=a.k)
    Predictor.print_rows(rows, a.format)
    return 0


def _embed(a) -> int:
    from biovita.embed.cache import embed_to_parquet

    n = embed_to_parquet(a.checkpoint, a.out, data=a.data, files=a.files, clap=a.clap)
    print(f"wrote {n} embeddings to {a.out}")
    return 0


def _export(a) -> int:
    from biovita.models.checkpoint import load_model, save_model
    from biovita.models.release import export_official

    model = load_model(a.checkpoint, clap=a.clap)
    if a.format == "official":
        out = export_official(model, a.out, clap=a.clap)
    else:
        out = save_model(model, a.out, metadata=model.checkpoint_metadata)
    print(f"wrote {a.format} layout to {out}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("list-models", help="list the named model configs")
    s.add_argument("pattern", nargs="?", default="*", help="glob, e.g. '*clap*'")
    s.set_defaults(fn=_list_models)

    s = sub.add_parser("predict", help="rank taxa for audio or image files")
    _add_checkpoint(s)
    s.add_argument("files", nargs="+", help="audio or image files (auto-detected)")
    s.add_argument("--rank", choices=("species", "genus", "family"), default="species")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--taxa", default=None, help="CSV of candidate taxa (class, order, family, "
                   "genus, scientific_name[, common_name]); default: the checkpoint's taxa")
    s.add_argument("--format", choices=("table", "csv"), default="table")
    s.set_defaults(fn=_predict)

    s = sub.add_parser("embed", help="embeddings of a store or files to Parquet (Ray Data)")
    _add_checkpoint(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help="Parquet store")
    g.add_argument("--files", nargs="+", help="audio or image files")
    s.add_argument("--out", required=True, help="output .parquet")
    s.set_defaults(fn=_embed)

    s = sub.add_parser("export", help="write a model in another layout (the release's, or biovita's)")
    _add_checkpoint(s)
    s.add_argument("--format", choices=("official", "biovita"), default="official",
                   help="official: open_clip_config.json + open_clip_pytorch_model.bin + "
                        "clap_weights.pth, as the release and the authors' extractor read it")
    s.add_argument("--out", required=True, help="output folder")
    s.set_defaults(fn=_export)
