"""Does jax-tpu-embedding's SparseCore lookup compile for a TPU topology, on a machine without a
TPU? AOT-compiles one table's lookup (1M x 64 float32 rows, 1,024 ids per chip, MOD-sharded over
the chips) on compile-only TPU devices and prints its per-chip memory and cost.

    pip install -e '.[tpu]'                                # jax[tpu]==0.10.2 (libtpu)
    pip install --no-deps --target sc_site jax-tpu-embedding==0.1.0
    PYTHONPATH=sc_site python docs/sparsecore_probe.py v5:2x2x1   # v5p (4 SparseCores per chip)
    PYTHONPATH=sc_site python docs/sparsecore_probe.py v6e:2x2    # v6e (2 per chip)

Not part of the package: a record of what was measured for the README's "SparseCore" notes.
"""

import functools
import sys

import jax
import jax.numpy as jnp
from jax.experimental import mesh_utils, topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax_tpu_embedding.sparsecore.lib.nn import embedding, embedding_spec
from jax_tpu_embedding.sparsecore.utils import utils

VOCAB, DIM, IDS_PER_CHIP = 1_000_000, 64, 1024


def main(topology: str) -> None:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    n = len(devices)
    # From device_kind: works on compile-only devices. Without a device argument the library asks
    # jax.devices()[0], the CPU here ("Unknown sparsecore count for device kind: cpu").
    num_sc = utils.num_sparsecores_per_device(devices[0])
    mesh = Mesh(mesh_utils.create_device_mesh((n,), devices), ("data",))
    table = embedding_spec.TableSpec(
        vocabulary_size=VOCAB, embedding_dim=DIM, initializer=jax.nn.initializers.normal(),
        optimizer=embedding_spec.SGDOptimizerSpec(learning_rate=0.01), combiner="sum", name="table",
        max_ids_per_partition=256, max_unique_ids_per_partition=256)
    feature = embedding_spec.FeatureSpec(table_spec=table, input_shape=(n * IDS_PER_CHIP, 1),
                                         output_shape=(n * IDS_PER_CHIP, DIM), name="feat")
    features = {"feat": feature}
    embedding.prepare_feature_specs_for_training(features, global_device_count=n, num_sc_per_device=num_sc)
    stacked = feature.table_spec.stacked_table_spec
    inputs = embedding.eval_preprocess_sparse_dense_matmul_input_shape(
        features, local_device_count=n, global_device_count=n, num_sc_per_device=num_sc)
    inputs = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P("data"))),
                          inputs)
    # The SparseCore table layout: with a plain NamedSharding XLA relayouts the whole table shard
    # on every call (~192 MB of temporaries per chip for this table).
    layout = utils.embedding_table_format(mesh, P("data", None))
    variables = {stacked.stack_name: embedding.EmbeddingVariables(
        table=jax.ShapeDtypeStruct((stacked.stack_vocab_size, stacked.stack_embedding_dim), jnp.float32,
                                   sharding=layout), slot=())}
    lookup = functools.partial(embedding.tpu_sparse_dense_matmul, global_device_count=n, feature_specs=features,
                               sharding_strategy="MOD", num_sc_per_device=num_sc)
    lookup = jax.shard_map(lookup, mesh=mesh, in_specs=(P("data"), P("data", None)), out_specs=P("data"),
                           check_vma=False)
    compiled = jax.jit(lookup, out_shardings=NamedSharding(mesh, P("data"))).lower(inputs, variables).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"{topology}: {n} chips ({devices[0].device_kind}), {num_sc} SparseCores per chip, compiled")
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
        print(f"  {key}: {getattr(memory, key):,}")
    print(f"  flops: {cost['flops']:,.0f}  bytes accessed: {cost['bytes accessed']:,.0f}")
    print(f"  SparseCore code in the compiled HLO: {'sparsecore' in compiled.as_text()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v5:2x2x1")
