"""gunicorn settings for one app process of a cluster.

    MESSAGE_QUEUE=redis://127.0.0.1:6379/0 gunicorn -c deploy/gunicorn.conf.py --bind 127.0.0.1:8001 'application:create_app()'

One worker per gunicorn: a Socket.IO client must stay on the process that holds its
session, and nginx's sticky sessions choose between addresses, not between the workers
behind one address. For more cores or machines, start more gunicorns on other ports
and list them in deploy/nginx.conf.
"""
worker_class = "gthread"
workers = 1
threads = 100  # each connected client holds a thread: this bounds the clients of this process
bind = "127.0.0.1:8001"
# By default every gunicorn on a machine would listen on the same control socket.
control_socket_disable = True


def worker_exit(server, worker):
    """Stop the producer; in a cluster, let another process lead at once, not after its lock expires."""
    worker.wsgi.extensions["feed"].stop()
