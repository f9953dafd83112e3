"""`biovita synth | convert | fetch | validate`: make and check a Parquet media store.

Each command imports what it needs when it runs (torch, Ray): `biovita --help` stays instant.
"""

from __future__ import annotations

import json


def _synth(a) -> int:
    if a.profile == "realistic":
        from biovita.data.synth_realistic import make_realistic

        m = make_realistic(a.out, n_species=a.species or 12, seed=a.seed, progress=True)
    else:
        from biovita.data.synth import DEFAULT_SPECIES, make_synthetic

        m = make_synthetic(a.out, n_species=a.species or DEFAULT_SPECIES, seed=a.seed, progress=True)
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


def _fetch(a) -> int:
    from biovita.data.fetch import fetch_release
    from biovita.data.http import FetchPolicy
    from biovita.frontends.image import MAX_IMAGE_PIXELS

    policy = FetchPolicy(timeout_s=a.timeout, max_attempts=a.max_attempts, backoff_s=a.backoff,
                         max_bytes=int(a.max_mb * 2**20), host_connections=a.host_connections,
                         host_rate=a.host_rate)
    report = fetch_release(a.clips, a.out, a.images, policy, url_column=a.url_column,
                           species_column=a.species_column, seed=a.seed,
                           test_fraction=a.test_fraction, unseen_species=a.unseen_species,
                           retry_rejected=a.retry_rejected, chunk_rows=a.chunk_rows,
                           actors=a.actors, threads=a.threads,
                           max_image_pixels=a.max_image_pixels or MAX_IMAGE_PIXELS,
                           mlflow_uri=a.mlflow_uri)
    print(report.summary())
    if a.report:
        with open(a.report, "w") as f:
            json.dump(report.as_dict(), f, indent=1)
    failed = sum(c.get("failed", 0) for c in report.outcomes.values())
    if failed:
        print(f"{failed} file(s) failed for now (timeouts, 5xx, 429): run the same command again "
              "to retry them", flush=True)
    return 0


def _validate(a) -> int:
    from biovita.data.validate import validate_store

    ok, report = validate_store(a.root, json_out=a.json)
    return 0 if ok else 1


def add_parsers(sub) -> None:
    s = sub.add_parser("synth", help="write the embedded synthetic dataset (Parquet store)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--species", type=int, default=None,
                   help="number of species (default: 40 embedded: 24 seen + 16 unseen; 12 realistic)")
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

    s = sub.add_parser(
        "fetch", help="download the release's URL lists into a Parquet store (a Ray Data job)",
        description="Download the release's clip list (train/metadata.csv) and image list "
        "(train/image_urls.csv) into a Parquet store, on Ray: per-host concurrency and rate "
        "limits, retries with backoff on timeouts/429/5xx (Retry-After honoured), none on "
        "403/404/410; every body is decoded before it is written and rejected by reason when it "
        "is not the media it should be. Re-running fetches only what is missing.",
        epilog="example:\n  biovita fetch --clips train/metadata.csv --images train/image_urls.csv "
        "--out s3://bucket/biovita-store --report fetch.json",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s.add_argument("--clips", default=None, help="the release's metadata.csv (download_url, source, "
                   "recording_id, file_name, scientific_name, accepted_name, class, order, family, genus, com)")
    s.add_argument("--images", default=None, help="the release's image URL list")
    s.add_argument("--out", required=True, help="output store (folder or s3:// / gs:// URI)")
    s.add_argument("--url-column", default=None,
                   help="image list: URL column (default: first of url, image_url, download_url, ...)")
    s.add_argument("--species-column", default=None,
                   help="image list: species column (default: accepted_name, else scientific_name, ...)")
    s.add_argument("--retry-rejected", action="store_true",
                   help="also retry rows rejected by an earlier run (404, HTML page, undecodable, ...)")
    g = s.add_argument_group("politeness and limits")
    g.add_argument("--host-connections", type=int, default=4, help="requests in flight per host (cluster-wide)")
    g.add_argument("--host-rate", type=float, default=5.0, help="requests started per second per host")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds to connect and per read")
    g.add_argument("--max-attempts", type=int, default=4, help="requests per URL in one run")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry's longest wait (doubles)")
    g.add_argument("--max-mb", type=float, default=100.0, help="larger bodies are rejected")
    g.add_argument("--max-image-pixels", type=int, default=None, help="decompression-bomb guard")
    g = s.add_argument_group("job")
    g.add_argument("--actors", type=int, default=4, help="fetcher actors (1 CPU each)")
    g.add_argument("--threads", type=int, default=8, help="download threads per actor")
    g.add_argument("--chunk-rows", type=int, default=32, help="rows per written shard")
    g.add_argument("--test-fraction", type=float, default=0.1, help="share of media held out for test")
    g.add_argument("--unseen-species", default=None, help="text file of species held out of training")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--report", default=None, help="also write the counts as JSON")
    g.add_argument("--mlflow-uri", default=None,
                   help="log a fetch run there (default: $MLFLOW_TRACKING_URI when set)")
    s.set_defaults(fn=_fetch)

    s = sub.add_parser("validate", help="schema check + full decode pass of a store (on Ray Data)")
    s.add_argument("root", help="store folder or URI")
    s.add_argument("--json", default=None, help="write the counts as JSON")
    s.set_defaults(fn=_validate)
