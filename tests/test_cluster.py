from pneumo_models import cluster, distribute


def test_outside_a_cluster_the_collectives_are_the_identity():
    strategy = distribute.make_strategy("one_device")
    assert cluster.broadcast_from_chief(strategy, b"abc") == b"abc"
    assert cluster.broadcast_json(strategy, {"a": [1, 2]}) == {"a": [1, 2]}
    assert cluster.gather_over_workers(strategy, [1, 2]).tolist() == [[1, 2]]
    assert cluster.agree(strategy, "chief-0", True, None)[0] is True


def test_replica_divergence_on_one_device_is_zero():
    import tensorflow as tf
    strategy = distribute.make_strategy("one_device")
    with strategy.scope():
        v = tf.Variable([1.0, 2.0])
    assert cluster.replica_divergence(strategy, [v]) == 0.0
