"""flower-p2p: the Flower app (ServerApp relay, ClientApp nodes, data, models, training)."""
