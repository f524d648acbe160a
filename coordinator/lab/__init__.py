"""The lab: what stands a cluster up on loopback for the demo, the tests and the benchmarks.

`lab` runs a coordinator and N agents as real processes (`memberguard lab ...`), `dqlite_nodes` and
`dqlite_cluster` the project's Go dqlite test node, `microcluster` real microcluster daemons, `bench` the
benchmarks; `go/` holds the Go programs they run and the script that builds them. The product never imports
this package: the CLI reaches it through `coordinator.lab.lab.register` alone.
"""
