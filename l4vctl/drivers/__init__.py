"""Device-class drivers on top of a Session and its virtqueues."""
