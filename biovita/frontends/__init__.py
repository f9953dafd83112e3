"""Front ends: encoded media -> model inputs (log-mels, image pixels). A leaf package: the
models, the data pipeline and the predictor all import it; it imports nothing of theirs."""
