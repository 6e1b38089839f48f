"""The social graph service and hybrid fan-out home timelines (push for most authors, pull for celebrities).

- ``writer.SocialGraphWriter``: follow / unfollow / block events -> followers and followees in Redis
  (the stream processor runs it beside ``social.lua``), and the follow backfill.
- ``store.SocialGraphStore``: bulk loads, counts, follower pages, post deletes.
- ``edges``: SNAP edge lists and the canonical ``follow_graph`` table.
- ``generator``: a synthetic graph with Twitter's follower power law and a celebrity tail.
- ``kuairand``: KuaiRand's graph (follows + RealGraph-style engaged authors) and post events.
- ``fanout.FanoutWorker``: post-created events -> followers' capped home timelines.
- ``timeline.HomeTimelineReader``: the read side (deletes, unfollows, blocks, mutes; lazy cleanup).
- ``config.FanoutSettings``: the ``fanout:`` settings.
"""
