-- The last position readers may see, and the last committed one.
SELECT visible, committed FROM {schema}.eventcore_heads()
