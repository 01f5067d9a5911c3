"""fedhubert on Flower: ServerApp and ClientApp over the `fedhubert` Rust extension."""
