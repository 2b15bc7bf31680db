# Denies downloads (curl, wget) from hosts the sandbox's network does not allow, before they
# run: `sandbox policy add network-egress -f network_egress.rego`.
#
# The built-in checks find them (rule net.egress_not_allowed, risk medium: the network
# refuses such connections anyway, so by default the command runs and fails); this policy
# turns them into a denial with the sandbox's mode and allowlist in its reason.
package devbox.network_egress

import rego.v1

default decision := "allow"

decision := "deny" if count(blocked) > 0

blocked contains f.reason if {
	some f in input.findings
	f.rule == "net.egress_not_allowed"
}

allowlist := "nothing" if count(input.sandbox.network.allow) == 0

allowlist := concat(", ", input.sandbox.network.allow) if count(input.sandbox.network.allow) > 0

reasons contains sprintf("%s (network mode %s; allowed: %s)", [r, input.sandbox.network.mode, allowlist]) if {
	some r in blocked
}
