"""`biovita serve`: identify and search on Ray Serve, with a web page.

Each command imports what it needs when it runs (torch, Ray): `biovita --help` stays instant.
"""

from __future__ import annotations


def _serve(a) -> int:
    import dataclasses
    import time

    import yaml

    from biovita.serve.app import ServeConfig, start
    from biovita.structured import build

    data = yaml.safe_load(open(a.config)) or {} if a.config else {}
    cfg = build(ServeConfig, data)
    given = {k: v for k, v in {"checkpoint": a.checkpoint, "gallery": a.gallery, "clap": a.clap,
                               "host": a.host, "port": a.port, "replicas": a.replicas}.items()
             if v is not None}
    cfg = dataclasses.replace(cfg, **given)
    if a.autoscale:
        lo, hi = (int(x) for x in a.autoscale.split(","))
        cfg.autoscaling = dataclasses.replace(cfg.autoscaling, min_replicas=lo, max_replicas=hi)
    url = start(cfg)
    print(f"biovita is serving on {url}  (POST /identify, POST /search; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def add_parsers(sub) -> None:
    from biovita.cli.models import CHECKPOINT_HELP, CLAP_HELP

    s = sub.add_parser(
        "serve", help="identify and search on Ray Serve, with a web page",
        description="Start a Ray Serve application: POST /identify (a recording or photo -> "
        "top-k taxa with probability), POST /search (a file or a name -> the nearest gallery "
        "recordings and photos), GET / (a page to drop a file on).",
        epilog="example:\n  biovita serve runs/embedded/models/stage2.phase2 --gallery data/synthetic\n"
        "  then open http://127.0.0.1:8000/",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--clap", default=None, metavar="NAME_OR_DIR", help=CLAP_HELP)
    s.add_argument("--gallery", default=None, metavar="STORE",
                   help="a store to search (embedded once on Ray Data, cached beside it)")
    s.add_argument("--host", default=None, help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=None, help="default 8000")
    s.add_argument("--replicas", type=int, default=None, help="model replicas (default 1)")
    s.add_argument("--autoscale", default=None, metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    s.add_argument("--config", default=None, help="a YAML file of ServeConfig keys "
                   "(replicas, autoscaling, max_batch_size, max_upload_mb, ...)")
    s.set_defaults(fn=_serve)
