"""`segue chaos`: prove a deployment survives faults. Closed-loop load, faults on a schedule
(signals, engine kills, client disconnects, network partitions), an oracle that compares every
answer with a fault-free run of the same request, a resource check after, and a report."""
