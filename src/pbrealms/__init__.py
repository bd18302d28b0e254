"""
pbrealms: a Perspective Broker server for twistd with a choice of realm
strategies, sessions that end exactly once, and a client.
"""
