"""Registry credentials the daemon obtains itself: kubelet's credential-provider plugins.

See docs/credentials.md.
"""

from snapshotter.credentials.providers import (
    CACHE_KEY_TYPES,
    PLUGIN_API_VERSIONS,
    PLUGIN_TIMEOUT_SEC,
    PluginSpec,
    ProviderConfig,
    ProviderKeychain,
    load_keychain,
    load_provider_config,
    match_image,
    parse_go_duration,
    parse_provider_config,
    repository_of,
)

__all__ = [
    "CACHE_KEY_TYPES",
    "PLUGIN_API_VERSIONS",
    "PLUGIN_TIMEOUT_SEC",
    "PluginSpec",
    "ProviderConfig",
    "ProviderKeychain",
    "load_keychain",
    "load_provider_config",
    "match_image",
    "parse_go_duration",
    "parse_provider_config",
    "repository_of",
]
