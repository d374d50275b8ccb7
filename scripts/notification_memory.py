"""What 10,000 users with a full history (HISTORY_SIZE=10) cost in one process: python scripts/notification_memory.py"""
import sys
import time
import tracemalloc
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from extras.notifications import Inboxes

for text_length in (40, 280):
    tracemalloc.start()
    inboxes = Inboxes(history_size=10, ttl=86400.0)
    for user_number in range(10_000):
        user = f"user{user_number:05d}"
        inbox = inboxes.open(user)
        for _ in range(10):
            # A new str per notification, as when each comes from a request.
            text = (f"{user_number:05d}" + "x" * text_length)[:text_length]
            inbox.add({"text": text, "id": inbox.last_id + 1, "time": time.time(), "stream": inbox.stream})
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"text of {text_length} chars: {current / 2**20:.1f} MiB for 10,000 users x 10, {current / 10_000 / 1024:.1f} KiB per user")
    del inboxes
