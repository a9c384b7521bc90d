//! Nothing here: the benches and examples of this crate measure `seen` against its peers (see `docs/benchmarks.md`).
