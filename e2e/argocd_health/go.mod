// The Argo CD health-script harness (see main.go): its own module, so the operator's Python
// project gains no Go dependency. Versions pinned as in argoproj/argo-cd's go.mod at 37ee0097.
module slmfleet.io/e2e/argocd_health

go 1.24

require (
	github.com/yuin/gopher-lua v1.1.2
	layeh.com/gopher-json v0.0.0-20190114024228-97fed8db8427
	sigs.k8s.io/yaml v1.6.0
)

require go.yaml.in/yaml/v2 v2.4.2 // indirect
