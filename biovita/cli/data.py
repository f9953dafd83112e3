"""`biovita synth | convert | validate`: make and check a Parquet media store."""

from __future__ import annotations

import json


def _synth(a) -> int:
    if a.profile == "realistic":
        from biovita.data.synth_realistic import make_realistic

        m = make_realistic(a.out, n_species=a.species or 12, seed=a.seed, progress=True)
    else:
        from biovita.data.synth import make_synthetic

        m = make_synthetic(a.out, n_species=a.species or 32, seed=a.seed, progress=True)
    print(json.dumps(m, indent=1))
    return 0


def _convert(a) -> int:
    from biovita.data.convert import convert_release
    from biovita.frontends.image import MAX_IMAGE_PIXELS

    report = convert_release(a.csv, a.audio_dir, a.image_dir, a.out, seed=a.seed,
                             test_fraction=a.test_fraction, unseen_species=a.unseen_species,
                             max_image_pixels=a.max_image_pixels or MAX_IMAGE_PIXELS)
    print(report.summary())
    if a.report:
        report.write(a.report)
    return 0


def _validate(a) -> int:
    from biovita.data.validate import validate_store

    ok, report = validate_store(a.root, json_out=a.json)
    return 0 if ok else 1


def add_parsers(sub) -> None:
    s = sub.add_parser("synth", help="write the embedded synthetic dataset (Parquet store)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--species", type=int, default=None,
                   help="number of species (default: 32 embedded, 12 realistic)")
    s.add_argument("--profile", choices=("embedded", "realistic"), default="embedded",
                   help="embedded: the small default (short clips, small images); realistic: shaped "
                        "like the release (5 s - 5 min recordings as MP3/M4A/WAV/FLAC/OGG, 1-12 MP "
                        "JPEG photos with EXIF orientation, the release's damaged files)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_synth)

    s = sub.add_parser("convert", help="convert the official release layout to a Parquet store")
    s.add_argument("--csv", required=True, help="release CSV (download_url, source, recording_id, "
                   "file_name, scientific_name, accepted_name, class, order, family, genus, com)")
    s.add_argument("--audio-dir", required=True, help="folder that file_name is relative to")
    s.add_argument("--image-dir", required=True, help="folder with one sub-folder per species")
    s.add_argument("--out", required=True, help="output store (folder or s3:// / gs:// URI)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="share of media held out for test")
    s.add_argument("--unseen-species", default=None,
                   help="text file of species (one per line) held out of training")
    s.add_argument("--max-image-pixels", type=int, default=None,
                   help="decompression-bomb guard (default: biovita's limit, 50 MP)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--report", default=None, help="also write the skip report as JSON")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("validate", help="schema check + full decode pass of a store (on Ray Data)")
    s.add_argument("root", help="store folder or URI")
    s.add_argument("--json", default=None, help="write the counts as JSON")
    s.set_defaults(fn=_validate)
